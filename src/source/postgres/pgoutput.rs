//! The `pgoutput` logical replication protocol (version 1), one message per
//! XLogData of a replication stream (one per row change). Begin, Commit and
//! logical messages never get here: pgwire-replication hands them over as
//! events of their own.
//! See "Logical Replication Message Formats" in the PostgreSQL manual.

use std::borrow::Cow;

use anyhow::{bail, Context, Result};

/// One column of a relation.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// One column value in a tuple, borrowing the message's bytes when they are
/// valid UTF-8 (they always are from a UTF-8 database).
#[derive(Debug, Clone, PartialEq)]
pub enum Datum<'a> {
    Null,
    /// An unchanged TOASTed value that was not sent.
    Unchanged,
    Text(Cow<'a, str>),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Relation {
        relid: u32,
        namespace: String,
        name: String,
        columns: Vec<Column>,
    },
    Insert {
        relid: u32,
        new: Vec<Datum<'a>>,
    },
    Update {
        relid: u32,
        old: Option<Vec<Datum<'a>>>,
        new: Vec<Datum<'a>>,
    },
    Delete {
        relid: u32,
        old: Vec<Datum<'a>>,
    },
    Truncate {
        relids: Vec<u32>,
    },
    /// Origin, Type and anything newer: not needed here.
    Other(u8),
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.buf.len() {
            bail!("pgoutput message truncated at byte {}", self.pos);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn cstr(&mut self) -> Result<String> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .context("pgoutput string not terminated")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum<'a>>> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' | b'b' => {
                    let len = self.i32()?;
                    let bytes = self.take(len.max(0) as usize)?;
                    Datum::Text(String::from_utf8_lossy(bytes))
                }
                k => bail!("unknown tuple column kind {:?}", k as char),
            });
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let relid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replident = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.i32()?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation {
                relid,
                namespace,
                name,
                columns,
            }
        }
        b'I' => {
            let relid = r.u32()?;
            let n = r.u8()?;
            if n != b'N' {
                bail!("insert: expected 'N', got {:?}", n as char);
            }
            Message::Insert {
                relid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relid = r.u32()?;
            let mut kind = r.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                bail!("update: expected 'N', got {:?}", kind as char);
            }
            Message::Update {
                relid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relid = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                bail!("delete: expected 'K' or 'O', got {:?}", kind as char);
            }
            Message::Delete {
                relid,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut relids = Vec::new();
            for _ in 0..n {
                relids.push(r.u32()?);
            }
            Message::Truncate { relids }
        }
        other => Message::Other(other),
    })
}

/// Formats an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn lsn_to_string(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN printed as `16/B374D848`.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s.split_once('/').context("LSN without '/'")?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(lsn_to_string(0x16_B374_D848), "16/B374D848");
        assert_eq!(lsn_to_string(0), "0/0");
    }

    #[test]
    fn decodes_insert() {
        let mut b = vec![b'I'];
        b.extend(7u32.to_be_bytes());
        b.push(b'N');
        b.extend(2i16.to_be_bytes());
        b.push(b't');
        b.extend(2i32.to_be_bytes());
        b.extend(b"42");
        b.push(b'n');
        assert_eq!(
            decode(&b).unwrap(),
            Message::Insert {
                relid: 7,
                new: vec![Datum::Text("42".into()), Datum::Null]
            }
        );
        assert!(decode(&b[..b.len() - 3]).is_err());
    }
}
