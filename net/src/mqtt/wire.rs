//! The data representations of MQTT §1.5: integers, Variable Byte Integers, UTF-8 strings,
//! binary data and string pairs, read from a `Bytes` without copying and written into a
//! `BytesMut`.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use super::DecodeError;

/// The largest value a Variable Byte Integer can hold (four bytes of seven bits).
pub const VARINT_MAX: u32 = 268_435_455;

/// The longest UTF-8 string or binary field: its length is a two-byte integer.
pub const FIELD_LENGTH_MAX: usize = u16::MAX as usize;

const TRUNCATED: DecodeError =
    DecodeError::malformed("§2.1.4", "a field runs past the end of the packet");

/// Decodes a Variable Byte Integer from the start of `buf`: `Ok(None)` when `buf` ends before
/// the last byte of the integer, else the value and the number of bytes it took.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (index, &byte) in buf.iter().enumerate() {
        if index == 4 {
            return Err(DecodeError::malformed(
                "§1.5.5",
                "Variable Byte Integer longer than four bytes",
            ));
        }
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            // A last byte of zero after the first means a longer encoding than needed.
            if index > 0 && byte == 0 {
                return Err(DecodeError::malformed(
                    "MQTT-1.5.5-1",
                    "Variable Byte Integer not in its shortest form",
                ));
            }
            return Ok(Some((value, index + 1)));
        }
    }
    Ok(None)
}

/// How many bytes `value` takes as a Variable Byte Integer; `None` above [`VARINT_MAX`], which
/// no Variable Byte Integer can hold.
pub fn varint_len(value: u32) -> Option<usize> {
    match value {
        0..=127 => Some(1),
        128..=16_383 => Some(2),
        16_384..=2_097_151 => Some(3),
        2_097_152..=VARINT_MAX => Some(4),
        _ => None,
    }
}

/// Writes `value` as a Variable Byte Integer. The encoder checks values with [`varint_len`]
/// first; a larger value is written as [`VARINT_MAX`] rather than panicking.
pub fn put_varint(buf: &mut BytesMut, value: u32) {
    let mut value = value.min(VARINT_MAX);
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// Checks the rules every MQTT UTF-8 string obeys: well-formed UTF-8 without surrogates
/// [MQTT-1.5.4-1] and without U+0000 [MQTT-1.5.4-2]; a peer that breaks either MUST be
/// disconnected. Other control characters and non-characters are allowed: the specification
/// lets a receiver refuse them but does not require it.
pub fn validate_utf8(bytes: Bytes) -> Result<ByteString, DecodeError> {
    if bytes.contains(&0) {
        return Err(DecodeError::malformed(
            "MQTT-1.5.4-2",
            "UTF-8 string contains U+0000",
        ));
    }
    ByteString::try_from(bytes).map_err(|_| {
        DecodeError::malformed(
            "MQTT-1.5.4-1",
            "UTF-8 string is ill-formed or encodes a surrogate",
        )
    })
}

/// A cursor over the body of one packet. Every read is bounds-checked; reading past the end is
/// a malformed packet, never a panic.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a Bytes,
    position: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf[start..end]`; bounds outside `buf` are clamped to it, so a reader
    /// never indexes past its buffer.
    pub fn new(buf: &'a Bytes, start: usize, end: usize) -> Self {
        let end = end.min(buf.len());
        Self {
            buf,
            position: start.min(end),
            end,
        }
    }

    pub fn remaining(&self) -> usize {
        self.end - self.position
    }

    pub fn is_empty(&self) -> bool {
        self.position == self.end
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < count {
            return Err(TRUNCATED);
        }
        let slice = &self.buf[self.position..self.position + count];
        self.position += count;
        Ok(slice)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        match decode_varint(&self.buf[self.position..self.end])? {
            Some((value, used)) => {
                self.position += used;
                Ok(value)
            }
            None => Err(TRUNCATED),
        }
    }

    /// A two-byte length and that many bytes, as a slice of the input.
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let length = usize::from(self.u16()?);
        if self.remaining() < length {
            return Err(TRUNCATED);
        }
        let field = self.buf.slice(self.position..self.position + length);
        self.position += length;
        Ok(field)
    }

    pub fn string(&mut self) -> Result<ByteString, DecodeError> {
        validate_utf8(self.binary()?)
    }

    /// Everything left, as a slice of the input.
    pub fn rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.position..self.end);
        self.position = self.end;
        rest
    }

    /// A reader over the next `length` bytes, which this reader skips.
    pub fn sub_reader(&mut self, length: usize) -> Result<Reader<'a>, DecodeError> {
        if self.remaining() < length {
            return Err(TRUNCATED);
        }
        let sub = Reader::new(self.buf, self.position, self.position + length);
        self.position += length;
        Ok(sub)
    }

    /// Fails unless every byte was read: bytes after the last field make a malformed packet.
    pub fn finish(&self, packet: &'static str) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::malformed("§2.1.4", packet))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        // The boundary values of MQTT 5.0 Table 1-1.
        for (value, bytes) in [
            (0u32, &[0x00u8][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, value);
            assert_eq!(&buf[..], bytes, "encoding {value}");
            assert_eq!(varint_len(value), Some(bytes.len()));
            assert_eq!(decode_varint(bytes), Ok(Some((value, bytes.len()))));
        }
    }

    #[test]
    fn varint_above_the_maximum_has_no_length_and_does_not_panic() {
        assert_eq!(varint_len(VARINT_MAX + 1), None);
        assert_eq!(varint_len(u32::MAX), None);
        let mut buf = BytesMut::new();
        put_varint(&mut buf, u32::MAX);
        assert_eq!(&buf[..], &[0xFF, 0xFF, 0xFF, 0x7F]);
    }

    #[test]
    fn varint_incomplete_overlong_and_non_minimal() {
        assert_eq!(decode_varint(&[]), Ok(None));
        assert_eq!(decode_varint(&[0x80, 0x80]), Ok(None));
        assert_eq!(
            decode_varint(&[0x80, 0x80, 0x80, 0x80, 0x01])
                .unwrap_err()
                .rule,
            "§1.5.5"
        );
        assert_eq!(
            decode_varint(&[0x80, 0x00]).unwrap_err().rule,
            "MQTT-1.5.5-1"
        );
    }

    #[test]
    fn utf8_rules() {
        assert!(validate_utf8(Bytes::from_static("a/ü/€/𝄞".as_bytes())).is_ok());
        assert_eq!(
            validate_utf8(Bytes::from_static(b"a\0b")).unwrap_err().rule,
            "MQTT-1.5.4-2"
        );
        // An encoded surrogate (U+D800) and an overlong encoding of '/'.
        for bad in [&b"\xED\xA0\x80"[..], b"\xC0\xAF", b"\xFF"] {
            assert_eq!(
                validate_utf8(Bytes::copy_from_slice(bad)).unwrap_err().rule,
                "MQTT-1.5.4-1"
            );
        }
        // U+FEFF must be kept, not stripped [MQTT-1.5.4-3].
        let kept = validate_utf8(Bytes::from_static(b"\xEF\xBB\xBFx")).unwrap();
        assert_eq!(&kept[..], "\u{FEFF}x");
    }
}
