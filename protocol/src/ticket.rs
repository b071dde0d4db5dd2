//! Tickets: one copy-pasteable line that names a device and how to reach it,
//! so people on a testnet connect without DNS or a directory.
//!
//! A ticket is `tern` followed by the lowercase base32 of a versioned record
//! holding the device key, its account and its addresses. Addresses are kept
//! as opaque bytes (binary multiaddrs): parsing them is the node's business.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    codec::{DecodeError, Record},
    identity::{AccountId, DevicePublicKey, base32_decode, base32_lower},
};

const PREFIX: &str = "tern";
/// Most addresses a ticket carries.
pub const MAX_ADDRS: usize = 16;
/// Longest address, in bytes.
pub const MAX_ADDR_LEN: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("a ticket starts with \"{PREFIX}\"")]
    MissingPrefix,
    #[error("ticket is too long ({0} characters)")]
    TooLong(usize),
    #[error("ticket is not valid base32 (was it cut off when copied?)")]
    BadEncoding,
    #[error("ticket is damaged: {0}")]
    Decode(#[from] DecodeError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub account: AccountId,
    pub device: DevicePublicKey,
    /// Binary multiaddrs, best first.
    pub addrs: Vec<Vec<u8>>,
}

impl Record for Ticket {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1 + 64 + 1 + MAX_ADDRS * (2 + MAX_ADDR_LEN);

    fn validate(&self) -> Result<(), DecodeError> {
        if self.addrs.len() > MAX_ADDRS {
            return Err(DecodeError::Invalid(format!(
                "{} addresses, at most {MAX_ADDRS}",
                self.addrs.len()
            )));
        }
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
            return Err(DecodeError::Invalid(format!(
                "an address of {} bytes, at most {MAX_ADDR_LEN}",
                a.len()
            )));
        }
        Ok(())
    }
}

impl Ticket {
    /// Builds a ticket, keeping the first [`MAX_ADDRS`] addresses that fit.
    pub fn new(account: AccountId, device: DevicePublicKey, addrs: Vec<Vec<u8>>) -> Self {
        let addrs = addrs
            .into_iter()
            .filter(|a| a.len() <= MAX_ADDR_LEN)
            .take(MAX_ADDRS)
            .collect();
        Self {
            account,
            device,
            addrs,
        }
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", base32_lower(&self.encode()))
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        // Base32 takes 8 characters per 5 bytes.
        let max_chars = PREFIX.len() + Self::MAX_LEN.div_ceil(5) * 8;
        if s.len() > max_chars {
            return Err(TicketError::TooLong(s.len()));
        }
        let body = s.strip_prefix(PREFIX).ok_or(TicketError::MissingPrefix)?;
        let bytes = base32_decode(body).ok_or(TicketError::BadEncoding)?;
        Ok(Self::decode(&bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AccountKeypair;

    fn ticket(addrs: Vec<Vec<u8>>) -> Ticket {
        let account = AccountKeypair::from_secret_bytes(&[1; 32]).id();
        let device = DevicePublicKey::from_bytes(
            *AccountKeypair::from_secret_bytes(&[2; 32]).id().as_bytes(),
        )
        .unwrap();
        Ticket::new(account, device, addrs)
    }

    #[test]
    fn round_trips_through_text() {
        let t = ticket(vec![vec![4, 127, 0, 0, 1, 6, 0x1f, 0x90], vec![1, 2, 3]]);
        let text = t.to_string();
        assert!(text.starts_with("tern"));
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(text.parse::<Ticket>().unwrap(), t);
        assert_eq!(format!("  {text}\n").parse::<Ticket>().unwrap(), t);
    }

    #[test]
    fn keeps_only_what_fits() {
        let t = ticket(
            vec![vec![0; MAX_ADDR_LEN + 1]; 1]
                .into_iter()
                .chain(vec![vec![1]; 40])
                .collect(),
        );
        assert_eq!(t.addrs.len(), MAX_ADDRS);
        assert!(t.to_string().parse::<Ticket>().is_ok());
    }

    #[test]
    fn tickets_with_keys_off_the_curve_are_rejected() {
        let mut bytes = ticket(vec![vec![1]]).encode();
        // Replace the device key with bytes that are not an Ed25519 point.
        let bad = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| DevicePublicKey::from_bytes(*k).is_err())
            .expect("some byte pattern is off the curve");
        bytes[33..65].copy_from_slice(&bad);
        assert!(Ticket::decode(&bytes).is_err());
    }

    #[test]
    fn damaged_tickets_give_clear_errors() {
        let text = ticket(vec![vec![1, 2, 3]]).to_string();
        assert_eq!("nope".parse::<Ticket>(), Err(TicketError::MissingPrefix));
        assert!(matches!(
            text[..text.len() - 9].parse::<Ticket>(),
            Err(TicketError::Decode(_) | TicketError::BadEncoding)
        ));
        assert_eq!(
            format!("{text}!").parse::<Ticket>(),
            Err(TicketError::BadEncoding)
        );
        assert!(matches!(
            "tern".repeat(2000).parse::<Ticket>(),
            Err(TicketError::TooLong(_))
        ));
    }
}
