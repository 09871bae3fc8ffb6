//! Addresses, hints and flags in JSON are hex strings ("0x7f12c0a00000"): JSON readers such as
//! jq and JavaScript hold numbers as doubles, which round u64 values above 2^53. Counts and
//! byte totals stay numbers.

use serde::Serializer;

/// `v` as JSON text: "0x..." (for `json!` objects).
pub fn hex(v: impl Into<u64>) -> String {
    format!("{:#x}", v.into())
}

/// For `#[serde(serialize_with = "output::hex::serialize")]` on an integer field.
pub fn serialize<T: Copy + Into<u64>, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{:#x}", (*v).into()))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct T {
        #[serde(serialize_with = "super::serialize")]
        addr: u64,
        #[serde(serialize_with = "super::serialize")]
        flags: u32,
        count: u64,
    }

    #[test]
    fn addresses_are_hex_strings_and_counts_numbers() {
        let t = T { addr: u64::MAX, flags: 0x22, count: u64::MAX };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"addr":"0xffffffffffffffff","flags":"0x22","count":18446744073709551615}"#
        );
        assert_eq!(super::hex(0u32), "0x0");
    }
}
