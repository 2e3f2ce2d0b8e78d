//! Bounds on what clients may send: every free-text field and list of the APIs is
//! checked against these before anything is stored, and refused with the field named.

/// Longest name (channel, site, job id, source id, a lineage entry), in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest free text (`requested_by`), in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Most entries of a job's lineage (tiers a job passed through).
pub const MAX_LINEAGE: usize = 64;
/// Most paths a job may be limited to.
pub const MAX_PATHS: usize = 10_000;

/// A field over its bound.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OverBound {
    #[error("{field} is {len} bytes long; at most {max} are accepted")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} has {count} entries; at most {max} are accepted")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
}

/// Checks one text field.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<(), OverBound> {
    match value.len() {
        len if len > max => Err(OverBound::TooLong { field, len, max }),
        _ => Ok(()),
    }
}

/// Checks a list: its length, and each entry's.
pub fn list(
    field: &'static str,
    values: &[String],
    max_count: usize,
    max_len: usize,
) -> Result<(), OverBound> {
    if values.len() > max_count {
        return Err(OverBound::TooMany {
            field,
            count: values.len(),
            max: max_count,
        });
    }
    values.iter().try_for_each(|v| text(field, v, max_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_over_their_bound_are_named() {
        assert_eq!(text("channel", "site", MAX_NAME_BYTES), Ok(()));
        let e = text("requested_by", &"x".repeat(3 << 20), MAX_TEXT_BYTES).unwrap_err();
        assert_eq!(
            e.to_string(),
            "requested_by is 3145728 bytes long; at most 1024 are accepted"
        );
        let many = vec!["t".to_string(); MAX_LINEAGE + 1];
        assert!(matches!(
            list("lineage", &many, MAX_LINEAGE, MAX_NAME_BYTES),
            Err(OverBound::TooMany { count: 65, .. })
        ));
        let long = vec!["t".repeat(MAX_NAME_BYTES + 1)];
        assert!(matches!(
            list("lineage", &long, MAX_LINEAGE, MAX_NAME_BYTES),
            Err(OverBound::TooLong {
                field: "lineage",
                ..
            })
        ));
    }
}
