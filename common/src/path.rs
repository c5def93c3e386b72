//! Path and name rules: no empty names, no `.`/`..`, no `/` or NUL inside a name, and at
//! most 255 bytes per name (ENAMETOOLONG beyond).

use crate::error::{FsError, FsResult};

pub const MAX_NAME_LEN: usize = 255;

pub fn validate_name(name: &[u8]) -> FsResult<()> {
    if name.len() > MAX_NAME_LEN {
        return Err(FsError::NameTooLong(name.len()));
    }
    if name.is_empty() || name == b"." || name == b".." {
        return Err(FsError::InvalidArgument(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(FsError::InvalidArgument(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    Ok(())
}

/// Splits an absolute or relative namespace path into validated components.
/// `"/"` and `""` yield no components.
pub fn components(path: &[u8]) -> FsResult<Vec<&[u8]>> {
    if path.contains(&0) {
        return Err(FsError::InvalidArgument("path contains NUL".into()));
    }
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        if part.is_empty() || part == b"." {
            continue;
        }
        validate_name(part)?;
        out.push(part);
    }
    Ok(out)
}

/// Joins a relative UFS path and a child name.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(parent.len() + 1 + name.len());
    out.extend_from_slice(parent);
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_posix_limits() {
        assert!(validate_name(b"ok name \xc3\xa9").is_ok());
        assert!(validate_name(&[b'a'; 255]).is_ok());
        assert_eq!(
            validate_name(&[b'a'; 256]).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn components_reject_dotdot() {
        assert_eq!(
            components(b"/a//b/./c/").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(components(b"/").unwrap().is_empty());
        assert!(components(b"a/../b").is_err());
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a/b", b"x"), b"a/b/x");
    }
}
