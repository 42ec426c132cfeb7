//! SHARE_GROUPS (issue 12; `crate::share`): which `$share` groups a node has members of, the
//! whole list, so every node computes the same winner of each shared message.
//!
//! ```text
//! SHARE_GROUPS := n:u32 (len:u16 group)*      group: "{ShareName}/{filter}", n <= MAX_SHARE_GROUPS
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{get_string16, need, put_str16, FrameError};

/// The most shared groups one node advertises (more are refused from a peer, and not sent).
pub const MAX_SHARE_GROUPS: usize = 4096;
/// The longest group name advertised (a ShareName, `/` and a filter).
pub const MAX_SHARE_GROUP_LEN: usize = 1024;
/// The most bytes of group names one frame carries (so it fits any mesh frame limit).
pub const MAX_SHARE_GROUPS_BYTES: usize = 64 * 1024;

/// Whether `g` can be advertised: `{ShareName}/{filter}`, both parts non-empty, bounded.
pub fn valid_share_group(g: &str) -> bool {
    g.len() <= MAX_SHARE_GROUP_LEN
        && g.split_once('/')
            .is_some_and(|(name, filter)| !name.is_empty() && !filter.is_empty())
}

pub(super) fn put_share_groups(o: &mut BytesMut, groups: &[String]) -> Result<(), FrameError> {
    let bytes: usize = groups.iter().map(String::len).sum();
    if groups.len() > MAX_SHARE_GROUPS || bytes > MAX_SHARE_GROUPS_BYTES {
        return Err(FrameError::Malformed("too many share groups"));
    }
    o.put_u32(groups.len() as u32);
    for g in groups {
        if !valid_share_group(g) {
            return Err(FrameError::Malformed("share group"));
        }
        put_str16(o, g.as_bytes())?;
    }
    Ok(())
}

pub(super) fn get_share_groups(b: &mut Bytes) -> Result<Vec<String>, FrameError> {
    need(b, 4, "share groups count")?;
    let n = b.get_u32() as usize;
    if n > MAX_SHARE_GROUPS {
        return Err(FrameError::Malformed("too many share groups"));
    }
    // Each takes at least 2 bytes: a count the frame cannot hold is refused before allocating.
    need(b, n.saturating_mul(2), "share groups")?;
    let mut groups = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let g = get_string16(b, "share group")?;
        if !valid_share_group(&g) {
            return Err(FrameError::Malformed("share group"));
        }
        bytes += g.len();
        if bytes > MAX_SHARE_GROUPS_BYTES {
            return Err(FrameError::Malformed("too many share groups"));
        }
        groups.push(g);
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::super::check::{assert_refused, framed};
    use super::super::{decode, encode, Frame, KIND_SHARE_GROUPS};
    use super::*;

    #[test]
    fn share_groups_round_trip() {
        let f = Frame::ShareGroups {
            groups: vec!["g/share/t".into(), "other/a/+/#".into()],
        };
        let bytes = encode(&f).expect("encodes");
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), 1 << 20),
            Ok(Some(f))
        );
        let empty = Frame::ShareGroups { groups: vec![] };
        let bytes = encode(&empty).expect("encodes");
        assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), 1 << 20),
            Ok(Some(empty))
        );
    }

    #[test]
    fn bad_share_groups_are_refused() {
        let body = |b: &[u8]| framed(KIND_SHARE_GROUPS, b);
        // A count over the bound.
        let mut over = BytesMut::new();
        over.put_u32(MAX_SHARE_GROUPS as u32 + 1);
        // A count the frame cannot hold.
        let mut short = BytesMut::new();
        short.put_u32(3);
        short.put_u16(1);
        short.put_slice(b"g");
        let mut cases = vec![
            (body(&over), FrameError::Malformed("too many share groups")),
            (body(&short), FrameError::Malformed("share groups")),
            // Missing the count, trailing bytes.
            (body(&[0, 0]), FrameError::Malformed("share groups count")),
            (
                body(&[0, 0, 0, 0, 7]),
                FrameError::Malformed("trailing bytes"),
            ),
        ];
        // Not `{ShareName}/{filter}`, not UTF-8, too long.
        for g in [&b"nofilter"[..], b"/t", b"g/", b"\xff/t", &[b'a'; 1100][..]] {
            let mut one = BytesMut::new();
            one.put_u32(1);
            one.put_u16(g.len() as u16);
            one.put_slice(g);
            cases.push((body(&one), FrameError::Malformed("share group")));
        }
        let cases: Vec<(&[u8], FrameError)> =
            cases.iter().map(|(b, e)| (&b[..], e.clone())).collect();
        assert_refused(&cases);
        // Too many or bad groups are not sent either.
        let many = vec!["g/t".to_string(); MAX_SHARE_GROUPS + 1];
        assert!(encode(&Frame::ShareGroups { groups: many }).is_err());
        let long = vec!["g/".to_string() + &"t".repeat(1000); 70];
        assert!(encode(&Frame::ShareGroups { groups: long }).is_err());
        let bad = vec!["g".to_string()];
        assert!(encode(&Frame::ShareGroups { groups: bad }).is_err());
    }
}
