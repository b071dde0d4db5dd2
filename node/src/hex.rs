//! Lower-case hex, the form of every id in the API, the events and the
//! data directory (chat ids, message ids, secret-chat ids).
//!
//! Written out here because it runs several times for every message a
//! node sends or receives (each event and answer names its chat and
//! message): a table lookup per byte into a string of the exact length.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lower-case hex, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_two_lower_case_digits_and_decodes_back() {
        let all: Vec<u8> = (0..=255).collect();
        let text = hex(&all);
        assert_eq!(text, data_encoding::HEXLOWER.encode(&all));
        assert_eq!(
            data_encoding::HEXLOWER.decode(text.as_bytes()).unwrap(),
            all
        );
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x0f, 0xa0]), "0fa0");
    }
}
