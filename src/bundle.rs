//! The bundle codec: one tablet's part of one backup (one shard of one table), as stored in the remote store.
//!
//! Layout (all integers little-endian):
//! ```text
//! magic "LSBN" | version u16 | reserved u16 | payload_len u32 | payload_crc32 u32 | payload
//! payload = backup_id u64 | table u32 | shard u32 | kind u8 | change_count u32 | change*
//! change  = tag u8 (0 = upsert, 1 = delete) | key u64 | value u64 (upsert only)
//! ```
//! Decoding checks the header, the length and the checksum before it reads a single row, so a truncated,
//! corrupted or unknown-version bundle yields a typed error naming the object and never partial rows.

use crate::model::{BackupKind, Change, TabletId};

const MAGIC: &[u8; 4] = b"LSBN";
/// The only bundle format version this build writes and reads.
pub const BUNDLE_VERSION: u16 = 1;
/// Bytes before the payload: magic, version, reserved, payload length, checksum.
pub const HEADER_LEN: usize = 16;

/// The decoded content of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Bundle {
    pub backup_id: u64,
    pub tablet: TabletId,
    pub kind: BackupKind,
    pub changes: Vec<Change>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {object}: truncated, {got} bytes where at least {needed} are needed")]
    Truncated { object: String, needed: usize, got: usize },
    #[error("bundle {object}: bad magic {found:02x?}, not a lockstep bundle")]
    BadMagic { object: String, found: [u8; 4] },
    #[error("bundle {object}: format version {found} is not supported (this build reads version {BUNDLE_VERSION})")]
    UnsupportedVersion { object: String, found: u16 },
    #[error("bundle {object}: {extra} unexpected bytes after the payload")]
    TrailingBytes { object: String, extra: usize },
    #[error("bundle {object}: payload checksum {actual:08x} does not match header checksum {expected:08x}")]
    ChecksumMismatch { object: String, expected: u32, actual: u32 },
    #[error("bundle {object}: malformed payload: {reason}")]
    Malformed { object: String, reason: String },
}

impl Bundle {
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(21 + self.changes.len() * 17);
        payload.extend_from_slice(&self.backup_id.to_le_bytes());
        payload.extend_from_slice(&self.tablet.table.0.to_le_bytes());
        payload.extend_from_slice(&self.tablet.shard.0.to_le_bytes());
        payload.push(match self.kind {
            BackupKind::Full => 0,
            BackupKind::Incremental => 1,
        });
        let count = u32::try_from(self.changes.len()).expect("change count fits in u32");
        payload.extend_from_slice(&count.to_le_bytes());
        for change in &self.changes {
            match *change {
                Change::Upsert { key, value } => {
                    payload.push(0);
                    payload.extend_from_slice(&key.to_le_bytes());
                    payload.extend_from_slice(&value.to_le_bytes());
                }
                Change::Delete { key } => {
                    payload.push(1);
                    payload.extend_from_slice(&key.to_le_bytes());
                }
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&BUNDLE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        let payload_len = u32::try_from(payload.len()).expect("payload fits in u32");
        out.extend_from_slice(&payload_len.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes and verifies a bundle. `object` names it in errors.
    pub fn decode(object: &str, bytes: &[u8]) -> Result<Self, BundleError> {
        Self::decode_with_payload_crc(object, bytes, true).map(|(bundle, _)| bundle)
    }

    /// Decodes without checking the payload checksum. Only the known-bug catalog uses this, to show that the
    /// checkers catch a shard that trusts its download.
    pub fn decode_unverified(object: &str, bytes: &[u8]) -> Result<Self, BundleError> {
        Self::decode_with_payload_crc(object, bytes, false).map(|(bundle, _)| bundle)
    }

    /// Decodes a bundle, verifying its payload checksum if `verify`, and returns it with the CRC-32 of the payload
    /// it was decoded from, computed from the bytes (the one pass that verifies them), never read from the header.
    pub fn decode_with_payload_crc(object: &str, bytes: &[u8], verify: bool) -> Result<(Self, u32), BundleError> {
        let payload = split_payload(object, bytes)?;
        let actual = crc32fast::hash(payload);
        if verify {
            let expected = read_u32(bytes, 12);
            if expected != actual {
                return Err(BundleError::ChecksumMismatch { object: object.to_string(), expected, actual });
            }
        }
        Ok((PayloadReader { object, bytes: payload, at: 0 }.read_bundle()?, actual))
    }

    /// The payload checksum the header of an encoded bundle records: for a bundle as [`Bundle::encode`] made it,
    /// the CRC-32 of its intact payload, without reading the payload. `None` when there is no whole header.
    pub fn recorded_payload_crc(bytes: &[u8]) -> Option<u32> {
        (bytes.len() >= HEADER_LEN).then(|| read_u32(bytes, 12))
    }
}

/// The CRC-32 of what follows the header of `bytes` (all of them when there is no whole header): what a shard
/// that applied these bytes reports having applied.
pub fn payload_crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes.get(HEADER_LEN..).unwrap_or(bytes))
}

/// Checks magic, version and length, and returns the payload slice.
fn split_payload<'a>(object: &str, bytes: &'a [u8]) -> Result<&'a [u8], BundleError> {
    if bytes.len() < HEADER_LEN {
        return Err(BundleError::Truncated { object: object.to_string(), needed: HEADER_LEN, got: bytes.len() });
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("slice of four bytes");
    if &magic != MAGIC {
        return Err(BundleError::BadMagic { object: object.to_string(), found: magic });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != BUNDLE_VERSION {
        return Err(BundleError::UnsupportedVersion { object: object.to_string(), found: version });
    }
    let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
    if reserved != 0 {
        return Err(BundleError::Malformed {
            object: object.to_string(),
            reason: format!("reserved header field is {reserved}, not 0"),
        });
    }
    let payload_len = read_u32(bytes, 8) as usize;
    let needed = HEADER_LEN + payload_len;
    if bytes.len() < needed {
        return Err(BundleError::Truncated { object: object.to_string(), needed, got: bytes.len() });
    }
    if bytes.len() > needed {
        return Err(BundleError::TrailingBytes { object: object.to_string(), extra: bytes.len() - needed });
    }
    Ok(&bytes[HEADER_LEN..])
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("slice of eight bytes"))
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("slice of four bytes"))
}

struct PayloadReader<'a> {
    object: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl PayloadReader<'_> {
    fn read_bundle(mut self) -> Result<Bundle, BundleError> {
        let backup_id = self.u64()?;
        let table = self.u32()?;
        let tablet = TabletId::new(table, self.u32()?);
        let kind = match self.u8()? {
            0 => BackupKind::Full,
            1 => BackupKind::Incremental,
            other => return Err(self.malformed(format!("unknown backup kind {other}"))),
        };
        let count = self.u32()? as usize;
        // Each change takes at least 9 bytes; a count that cannot fit is corruption, not a reason to allocate.
        if count > (self.bytes.len() - self.at) / 9 {
            return Err(self.malformed(format!("change count {count} does not fit in the payload")));
        }
        let mut changes = Vec::with_capacity(count);
        for index in 0..count {
            // One bounds check per change rather than per field: a change is read whole or not at all.
            let rest = &self.bytes[self.at..];
            let change = match rest.first() {
                Some(0) if rest.len() >= 17 => Change::Upsert { key: le_u64(&rest[1..9]), value: le_u64(&rest[9..17]) },
                Some(1) if rest.len() >= 9 => Change::Delete { key: le_u64(&rest[1..9]) },
                Some(0 | 1) | None => {
                    return Err(self.malformed(format!("payload ends inside change {index} at byte {}", self.at)));
                }
                Some(other) => return Err(self.malformed(format!("unknown change tag {other}"))),
            };
            self.at += if matches!(change, Change::Upsert { .. }) { 17 } else { 9 };
            changes.push(change);
        }
        if self.at != self.bytes.len() {
            return Err(self.malformed(format!("{} bytes left after the last change", self.bytes.len() - self.at)));
        }
        Ok(Bundle { backup_id, tablet, kind, changes })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], BundleError> {
        if self.bytes.len() - self.at < n {
            return Err(self.malformed(format!("payload ends inside a field at byte {}", self.at)));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, BundleError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, BundleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self) -> Result<u64, BundleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }

    fn malformed(&self, reason: String) -> BundleError {
        BundleError::Malformed { object: self.object.to_string(), reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            backup_id: 7,
            tablet: TabletId::new(1, 2),
            kind: BackupKind::Incremental,
            changes: vec![
                Change::Upsert { key: 1, value: 10 },
                Change::Delete { key: 2 },
                Change::Upsert { key: 2, value: 20 },
            ],
        }
    }

    #[test]
    fn bundle_round_trips() {
        let bytes = sample().encode();
        assert_eq!(Bundle::decode("obj", &bytes), Ok(sample()));
    }

    #[test]
    fn the_reported_payload_checksum_is_computed_from_the_bytes_decoded() {
        let bytes = sample().encode();
        let recorded = Bundle::recorded_payload_crc(&bytes).expect("a whole header");
        assert_eq!(recorded, crc32fast::hash(&bytes[HEADER_LEN..]));
        assert_eq!(payload_crc32(&bytes), recorded);
        assert_eq!(Bundle::decode_with_payload_crc("obj", &bytes, true), Ok((sample(), recorded)));
        // A flipped bit in a change's value still decodes when the checksum is not verified, and the checksum
        // reported is that of the damaged payload, not the one the header records.
        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let (bundle, crc) = Bundle::decode_with_payload_crc("obj", &damaged, false).expect("decodes unverified");
        assert_ne!(bundle, sample());
        assert_eq!(crc, payload_crc32(&damaged));
        assert_ne!(crc, recorded);
        assert!(matches!(
            Bundle::decode_with_payload_crc("obj", &damaged, true),
            Err(BundleError::ChecksumMismatch { .. })
        ));
        assert_eq!(Bundle::recorded_payload_crc(&bytes[..HEADER_LEN - 1]), None);
    }

    #[test]
    fn every_truncation_of_a_bundle_is_a_truncated_error_naming_the_object() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            match Bundle::decode("backups/7/shard-2", &bytes[..len]) {
                Err(BundleError::Truncated { object, got, .. }) => {
                    assert_eq!(object, "backups/7/shard-2");
                    assert_eq!(got, len);
                }
                other => panic!("length {len}: expected Truncated, got {other:?}"),
            }
        }
    }

    #[test]
    fn every_single_byte_corruption_of_the_payload_is_detected() {
        let bytes = sample().encode();
        for at in HEADER_LEN..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x40;
            assert!(
                matches!(Bundle::decode("obj", &corrupt), Err(BundleError::ChecksumMismatch { .. })),
                "flipping byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn corrupted_header_bytes_are_rejected() {
        let bytes = sample().encode();
        for at in 0..HEADER_LEN {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x01;
            assert!(Bundle::decode("obj", &corrupt).is_err(), "flipping header byte {at} went unnoticed");
        }
    }

    #[test]
    fn unknown_version_is_named_in_the_error() {
        let mut bytes = sample().encode();
        bytes[4..6].copy_from_slice(&9u16.to_le_bytes());
        let err = Bundle::decode("obj", &bytes).unwrap_err();
        assert_eq!(err, BundleError::UnsupportedVersion { object: "obj".into(), found: 9 });
        assert!(err.to_string().contains("version 9"));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = sample().encode();
        bytes.push(0);
        assert!(matches!(Bundle::decode("obj", &bytes), Err(BundleError::TrailingBytes { extra: 1, .. })));
    }

    #[test]
    fn unverified_decode_accepts_a_corrupt_value_byte() {
        let mut bytes = sample().encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let decoded = Bundle::decode_unverified("obj", &bytes).unwrap();
        assert_ne!(decoded, sample());
    }

    #[test]
    fn a_huge_change_count_is_malformed_not_an_allocation() {
        let mut bundle = sample();
        bundle.changes.clear();
        let mut bytes = bundle.encode();
        let count_at = HEADER_LEN + 13;
        bytes[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Bundle::decode_unverified("obj", &bytes), Err(BundleError::Malformed { .. })));
    }

    /// A payload cut short after its change count (with a checksum that matches, as a buggy writer would make):
    /// every cut is malformed, naming the change it ends in or the count that cannot fit, and yields no rows.
    #[test]
    fn a_change_cut_short_inside_a_checksummed_payload_is_malformed() {
        let full = sample().encode();
        let payload = &full[HEADER_LEN..];
        let changes_at = 21;
        for cut in changes_at + 1..payload.len() {
            let payload = &payload[..cut];
            let mut bytes = full[..HEADER_LEN].to_vec();
            bytes[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes[12..16].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
            bytes.extend_from_slice(payload);
            match Bundle::decode("obj", &bytes) {
                Err(BundleError::Malformed { object, reason }) => {
                    assert_eq!(object, "obj");
                    assert!(reason.contains("ends inside change") || reason.contains("does not fit"), "{reason}");
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    /// `payload` behind a header that is right for it: the magic, this version, its length and its checksum.
    fn with_header(payload: &[u8]) -> Vec<u8> {
        let mut bytes = sample().encode()[..HEADER_LEN].to_vec();
        bytes[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes[12..16].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0xb0_0d1e),
            ..Default::default()
        })]

        /// Whatever a store hands back, decoding gives a typed error or a bundle that is exactly those bytes:
        /// never a panic, never rows read out of a damaged or foreign object.
        #[test]
        fn any_bytes_decode_to_an_error_or_to_a_bundle_of_exactly_those_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
        ) {
            if let Ok(bundle) = Bundle::decode("obj", &bytes) {
                proptest::prop_assert_eq!(bundle.encode(), bytes);
            }
        }

        /// The same for a payload that a writer checksummed itself (so only the payload's own structure can
        /// refuse it): a short, long, mis-tagged or miscounted payload is an error naming the object.
        #[test]
        fn any_checksummed_payload_decodes_to_a_named_error_or_to_exactly_that_payload(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            bundle_bytes in proptest::bool::ANY,
        ) {
            // Half the time a real payload with bytes changed and its end cut, which gets further into the decoder.
            let payload = if bundle_bytes {
                let mut real = sample().encode()[HEADER_LEN..].to_vec();
                for (i, byte) in payload.iter().enumerate().take(3) {
                    let at = (usize::from(*byte) * 7 + i) % real.len();
                    real[at] ^= byte | 1;
                }
                real.truncate(real.len() + 1 - payload.len().min(real.len()));
                real
            } else {
                payload
            };
            let bytes = with_header(&payload);
            match Bundle::decode("backups/3/t0-s1", &bytes) {
                Ok(bundle) => proptest::prop_assert_eq!(bundle.encode(), bytes),
                Err(error) => proptest::prop_assert!(error.to_string().contains("backups/3/t0-s1"), "{error}"),
            }
        }
    }
}
