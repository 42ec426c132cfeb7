//! What a broker has yet to write to the HA server (retained messages by topic, sessions by
//! client ID): one entry per key (the last write of a key replaces the one waiting), taken in
//! the order keys began to wait, at most a bound of keys. Pure: no I/O, no clock (the caller
//! stamps the times).

use std::collections::{HashMap, VecDeque};

use mqlb_ha_api::retained::RetainedEntry;
use mqlb_ha_api::sessions::SessionEntry;

/// An entry of a [`Pending`] queue.
pub(crate) trait Keyed {
    fn key(&self) -> &str;
    /// Bytes it takes, roughly (what batches are bounded by).
    fn size(&self) -> usize;
}

impl Keyed for RetainedEntry {
    fn key(&self) -> &str {
        &self.topic
    }
    fn size(&self) -> usize {
        RetainedEntry::size(self)
    }
}

impl Keyed for SessionEntry {
    fn key(&self) -> &str {
        &self.client_id
    }
    fn size(&self) -> usize {
        SessionEntry::size(self)
    }
}

/// What [`Pending::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// A topic that was not waiting.
    Added,
    /// A topic already waiting: its entry is this one now.
    Replaced,
    /// A new topic while the bound's worth wait: dropped (the caller counts it).
    Dropped,
}

pub(crate) struct Pending<E> {
    entries: HashMap<String, E>,
    /// Topics of `entries`, oldest first (each once).
    order: VecDeque<String>,
    max_topics: usize,
    /// The last time stamped: times never go back, so of two writes of a topic from this
    /// broker the later always wins in the store, whatever the wall clock does.
    last_at: i64,
}

impl<E: Keyed> Pending<E> {
    pub(crate) fn new(max_topics: usize) -> Pending<E> {
        Pending {
            entries: HashMap::new(),
            order: VecDeque::new(),
            max_topics,
            last_at: i64::MIN,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The time of a write taken at wall-clock `now_ms`: never before the last one.
    pub(crate) fn stamp(&mut self, now_ms: i64) -> i64 {
        self.last_at = self.last_at.max(now_ms);
        self.last_at
    }

    pub(crate) fn push(&mut self, entry: E) -> Pushed {
        if let Some(waiting) = self.entries.get_mut(entry.key()) {
            *waiting = entry;
            return Pushed::Replaced;
        }
        if self.entries.len() >= self.max_topics {
            return Pushed::Dropped;
        }
        let key = entry.key().to_string();
        self.order.push_back(key.clone());
        self.entries.insert(key, entry);
        Pushed::Added
    }

    /// The next batch: the oldest waiting topics, at most `max_entries` of them and, past the
    /// first, no more than `max_bytes` (a larger message goes alone).
    pub(crate) fn take(&mut self, max_entries: usize, max_bytes: usize) -> Vec<E> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < max_entries {
            let Some(topic) = self.order.front() else {
                break;
            };
            let size = self.entries.get(topic).map_or(0, Keyed::size);
            if !batch.is_empty() && bytes + size > max_bytes {
                break;
            }
            let Some(topic) = self.order.pop_front() else {
                break;
            };
            if let Some(e) = self.entries.remove(&topic) {
                bytes += size;
                batch.push(e);
            }
        }
        batch
    }

    /// A batch whose write failed waits again, first in line, except the topics written
    /// again meanwhile (their newer entry waits already). It may take the queue past its
    /// bound by one batch: what was accepted is not dropped for a failed write.
    pub(crate) fn put_back(&mut self, batch: Vec<E>) {
        for e in batch.into_iter().rev() {
            if self.entries.contains_key(e.key()) {
                continue;
            }
            let key = e.key().to_string();
            self.order.push_front(key.clone());
            self.entries.insert(key, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqlb_ha_api::retained::RetainedProps;

    fn e(topic: &str, payload: &[u8], at_ms: i64) -> RetainedEntry {
        RetainedEntry {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 0,
            at_ms,
            props: RetainedProps::default(),
        }
    }

    fn topics(batch: &[RetainedEntry]) -> Vec<&str> {
        batch.iter().map(|e| e.topic.as_str()).collect()
    }

    #[test]
    fn the_last_write_of_a_topic_waits_in_its_first_place() {
        let mut p = Pending::new(10);
        assert_eq!(p.push(e("a", b"1", 1)), Pushed::Added);
        assert_eq!(p.push(e("b", b"1", 2)), Pushed::Added);
        assert_eq!(
            p.push(e("a", b"", 3)),
            Pushed::Replaced,
            "a clearing replaces"
        );
        let batch = p.take(10, 1 << 20);
        assert_eq!(topics(&batch), ["a", "b"]);
        assert!(batch[0].is_clear());
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn the_bound_drops_new_topics_only() {
        let mut p = Pending::new(2);
        p.push(e("a", b"1", 1));
        p.push(e("b", b"1", 1));
        assert_eq!(p.push(e("c", b"1", 1)), Pushed::Dropped);
        assert_eq!(p.push(e("b", b"2", 2)), Pushed::Replaced);
        assert_eq!(topics(&p.take(10, 1 << 20)), ["a", "b"]);
    }

    #[test]
    fn batches_are_bounded_in_count_and_bytes_but_a_large_entry_goes_alone() {
        let mut p = Pending::new(100);
        for i in 0..5 {
            p.push(e(&format!("t{i}"), &[0; 100], 1));
        }
        p.push(e("big", &[0; 10_000], 1));
        assert_eq!(topics(&p.take(2, 1 << 20)), ["t0", "t1"]);
        assert_eq!(
            topics(&p.take(10, 300)),
            ["t2", "t3"],
            "two fit in 300 bytes"
        );
        assert_eq!(topics(&p.take(10, 300)), ["t4"]);
        assert_eq!(
            topics(&p.take(10, 300)),
            ["big"],
            "larger than a batch: alone"
        );
        assert!(p.take(10, 300).is_empty());
    }

    #[test]
    fn a_failed_batch_goes_first_unless_written_again() {
        let mut p = Pending::new(100);
        p.push(e("a", b"1", 1));
        p.push(e("b", b"1", 1));
        let batch = p.take(10, 1 << 20);
        p.push(e("c", b"1", 2));
        p.push(e("a", b"2", 2));
        p.put_back(batch);
        let again = p.take(10, 1 << 20);
        assert_eq!(topics(&again), ["b", "c", "a"]);
        assert_eq!(again[2].payload, b"2", "the newer write of a stays");
    }

    #[test]
    fn stamps_never_go_back() {
        let mut p: Pending<RetainedEntry> = Pending::new(1);
        assert_eq!(p.stamp(100), 100);
        assert_eq!(p.stamp(90), 100, "the wall clock stepped back");
        assert_eq!(p.stamp(120), 120);
    }
}
