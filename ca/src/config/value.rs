//! Values the configuration's sections share the reading of.

use std::time::Duration;

use meshid_api::config::{invalid, ConfigError};

/// A duration written as humantime (`90s`, `10m`, `24h`) for `key`, `default` when absent;
/// zero is refused.
pub(super) fn duration(
    key: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => {
            let d = humantime::parse_duration(v).map_err(|e| {
                invalid(
                    key,
                    format!("{v:?} is not a duration ({e}); write e.g. 90s, 10m, 24h"),
                )
            })?;
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
            Ok(d)
        }
    }
}
