//! Loading TOML config files strictly: unknown keys and bad values are errors that name
//! the key and the file, never silently ignored.

use std::path::Path;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config value `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Parses `text` (from `origin`, for messages) into `T`. Structs should use
/// `#[serde(deny_unknown_fields)]` so a typo in a key is reported with its name.
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytesize::ByteSize;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        capacity: ByteSize,
        #[serde(default)]
        port: u16,
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = parse_toml::<Sample>("capacity = 1\ncapasity = 2\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("capasity"), "{err}");
        let err = parse_toml::<Sample>("capacity = \"lots\"\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
        let err = parse_toml::<Sample>("capacity = 1\nport = -3\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
        assert_eq!(
            parse_toml::<Sample>("capacity = \"2KiB\"", "x")
                .unwrap()
                .capacity
                .0,
            2048
        );
    }
}
