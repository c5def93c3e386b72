//! Length-prefixed framing for the block data protocol: `[u32 BE len][prost header]`,
//! followed by a raw payload whose length the header states. Decoding never trusts a
//! length it has not bounded first, so a malformed peer gets an error, not a panic or
//! an unbounded allocation.

use std::io::{self, Read, Write};

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest header accepted; real headers are a few hundred bytes.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge(usize),
    #[error("empty frame header")]
    EmptyHeader,
    #[error("undecodable frame header: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl FrameError {
    /// True when the peer closed the connection cleanly between frames.
    pub fn is_eof(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof)
    }
}

/// Encodes `msg` as one length-prefixed header.
pub fn encode_header<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut out).expect("Vec has room for the message");
    out
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::EmptyHeader);
    }
    if len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLarge(len));
    }
    Ok(())
}

/// Decodes one header from the front of `buf`; returns it and the bytes consumed.
/// `Ok(None)` means `buf` holds only part of a frame.
pub fn decode_header<M: Message + Default>(buf: &[u8]) -> Result<Option<(M, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    check_len(len)?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((M::decode(&buf[4..4 + len])?, 4 + len)))
}

/// Writes one header frame.
pub fn write_header<M: Message, W: Write>(w: &mut W, msg: &M) -> io::Result<()> {
    w.write_all(&encode_header(msg))
}

/// Reads one header frame from a blocking stream.
pub fn read_header<M: Message + Default, R: Read>(r: &mut R) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(M::decode(buf.as_slice())?)
}

/// Reads one header frame from an async stream.
pub async fn read_header_async<M, R>(r: &mut R) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let len = r.read_u32().await? as usize;
    check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ReadBlockRequest, ReadBlockResponse};

    fn request() -> ReadBlockRequest {
        ReadBlockRequest {
            request_id: 7,
            file_id: 42,
            index: 3,
            ufs_path: b"a/b c".to_vec(),
            length: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_through_blocking_io() {
        let mut buf = Vec::new();
        write_header(&mut buf, &request()).unwrap();
        let got: ReadBlockRequest = read_header(&mut buf.as_slice()).unwrap();
        assert_eq!(got, request());
    }

    #[tokio::test]
    async fn round_trips_through_async_io() {
        let buf = encode_header(&request());
        let got: ReadBlockRequest = read_header_async(&mut buf.as_slice()).await.unwrap();
        assert_eq!(got, request());
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let buf = encode_header(&request());
        for cut in 0..buf.len() {
            assert!(decode_header::<ReadBlockRequest>(&buf[..cut])
                .unwrap()
                .is_none());
        }
        let (msg, used) = decode_header::<ReadBlockRequest>(&buf).unwrap().unwrap();
        assert_eq!((msg, used), (request(), buf.len()));
    }

    #[test]
    fn oversized_and_empty_headers_are_rejected() {
        let huge = ((MAX_HEADER_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_header::<ReadBlockRequest, _>(&mut huge.as_slice()),
            Err(FrameError::HeaderTooLarge(_))
        ));
        let empty = 0u32.to_be_bytes();
        assert!(matches!(
            decode_header::<ReadBlockRequest>(&empty),
            Err(FrameError::EmptyHeader)
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // Deterministic pseudo-random garbage of many lengths.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for n in 1..2000usize {
            let mut buf = Vec::with_capacity(n + 4);
            buf.extend_from_slice(&((n as u32).min(64)).to_be_bytes());
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode_header::<ReadBlockResponse>(&buf);
            let _ = read_header::<ReadBlockResponse, _>(&mut buf.as_slice());
        }
    }

    #[test]
    fn truncated_stream_reports_eof() {
        let buf = encode_header(&request());
        let err = read_header::<ReadBlockRequest, _>(&mut &buf[..buf.len() - 1]).unwrap_err();
        assert!(err.is_eof());
    }
}
