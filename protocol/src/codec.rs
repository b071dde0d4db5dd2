//! Versioned, length-bounded record encoding.
//!
//! Every record on the wire or on disk is one version byte followed by the
//! postcard encoding of the record. Decoding checks the total length against a
//! bound *before* anything is parsed, so a hostile length prefix inside the
//! record can never make us allocate more than that bound: postcard reads from
//! the given slice and cannot claim bytes that are not there.

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be decoded into a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("record is empty")]
    Empty,
    #[error("unsupported record version {found} (this build understands {expected})")]
    UnsupportedVersion { found: u8, expected: u8 },
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("record has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// A postcard flavor that appends to a borrowed Vec (postcard's own
/// `AllocVec` starts empty and grows by doubling: a megabyte push was
/// copied a dozen times on its way out).
struct ExtendVec<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for ExtendVec<'_> {
    type Output = ();

    fn try_push(&mut self, b: u8) -> postcard::Result<()> {
        self.0.push(b);
        Ok(())
    }

    fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(b);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends `value`'s postcard encoding, without a version byte, to `out`:
/// how a record is written inside another, whose version covers it (an
/// entry in a push is its kept record less the record's first byte).
pub fn encode_nested<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // postcard serialisation only fails for types serde cannot describe
    // (e.g. maps with non-string keys in some formats) or a flavor that
    // runs out of room; our record types are plain structs and a Vec
    // grows, so this is an invariant, not input handling.
    postcard::serialize_with_flavor(value, ExtendVec(out))
        .expect("record types are always serialisable");
}

/// The length of [`encode_nested`]'s output, found without building it.
pub fn nested_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor::<_, _, usize>(value, postcard::ser_flavors::Size::default())
        .expect("record types are always serialisable")
}

/// A record type with a fixed format version and a size bound.
pub trait Record: Serialize + DeserializeOwned {
    /// The format version written in front of every encoding.
    const VERSION: u8;
    /// The largest encoding a decoder accepts, version byte included.
    const MAX_LEN: usize;

    /// Checks invariants serde cannot express (bounded collections, valid
    /// keys). Called by [`Record::decode`] after parsing.
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoding to `out`, which grows once, to the exact size.
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(Self::VERSION);
        encode_nested(self, out);
    }

    /// The length of [`Record::encode`]'s output, found without building it.
    fn encoded_len(&self) -> usize {
        1 + nested_len(self)
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > Self::MAX_LEN {
            return Err(DecodeError::TooLong {
                len: bytes.len(),
                max: Self::MAX_LEN,
            });
        }
        let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != Self::VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                expected: Self::VERSION,
            });
        }
        let (record, rest): (Self, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len()));
        }
        record.validate()?;
        Ok(record)
    }
}

/// Serde helpers for fixed-size byte arrays larger than serde's built-in 32.
pub(crate) mod bytes64 {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<[u8; 64], E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A byte vector written in one piece. On the wire it is exactly what a
/// `Vec<u8>` is in postcard (a length, then the bytes), but it is encoded
/// and decoded as one slice instead of byte by byte.
pub(crate) mod bytes_vec {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn bytes_vec_is_the_same_on_the_wire_as_a_vec() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain(Vec<u8>);
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Fast(#[serde(with = "bytes_vec")] Vec<u8>);
        for len in [0, 1, 127, 128, 300, 70_000] {
            let v: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let a = postcard::to_allocvec(&Plain(v.clone())).unwrap();
            let b = postcard::to_allocvec(&Fast(v.clone())).unwrap();
            assert_eq!(a, b);
            assert_eq!(postcard::from_bytes::<Fast>(&a).unwrap(), Fast(v));
        }
        // A length beyond the input is an error, not an allocation.
        assert!(postcard::from_bytes::<Fast>(&[0xff, 0xff, 0xff, 0x7f, 1]).is_err());
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        items: Vec<Vec<u8>>,
    }
    impl Record for Probe {
        const VERSION: u8 = 3;
        const MAX_LEN: usize = 64;
    }

    #[test]
    fn round_trips() {
        let p = Probe {
            items: vec![b"ab".to_vec(), vec![]],
        };
        assert_eq!(Probe::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn rejects_oversized_input_before_parsing() {
        let bytes = vec![3u8; 65];
        assert_eq!(
            Probe::decode(&bytes),
            Err(DecodeError::TooLong { len: 65, max: 64 })
        );
    }

    #[test]
    fn rejects_wrong_version_and_trailing_bytes() {
        let mut bytes = Probe { items: vec![] }.encode();
        bytes[0] = 9;
        assert!(matches!(
            Probe::decode(&bytes),
            Err(DecodeError::UnsupportedVersion {
                found: 9,
                expected: 3
            })
        ));
        let mut bytes = Probe { items: vec![] }.encode();
        bytes.push(0);
        assert_eq!(Probe::decode(&bytes), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate_or_panic() {
        // version, then a sequence claiming u32::MAX elements.
        let bytes = [3u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(matches!(
            Probe::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = Probe {
            items: vec![b"hello".to_vec(), b"world".to_vec()],
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(Probe::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
