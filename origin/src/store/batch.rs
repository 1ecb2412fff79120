//! A batch of commands sent in as few round trips as the deployment allows: one pipeline on a
//! single node; on a cluster, one pipeline per hash slot, all sent concurrently (a pipeline
//! must not span slots there). Replies come back in the order the commands were added.

use futures_util::future::try_join_all;
use redis::{Cmd, RedisResult, Value};

use super::conn::Conn;

/// Redis Cluster has 16384 slots.
const SLOTS: u16 = 16384;

struct Command {
    cmd: Cmd,
    slot: u16,
    /// The reply is dropped (an `EXPIRE` riding along with its `INCRBY`).
    ignored: bool,
}

/// Commands, each with the key that places it.
#[derive(Default)]
pub struct Batch {
    commands: Vec<Command>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds `cmd`, which touches only `key` (or keys of its slot); its reply is returned.
    pub fn push(&mut self, key: &str, cmd: Cmd) -> &mut Batch {
        self.add(key, cmd, false)
    }

    /// Adds `cmd` whose reply is not returned.
    pub fn push_ignored(&mut self, key: &str, cmd: Cmd) -> &mut Batch {
        self.add(key, cmd, true)
    }

    fn add(&mut self, key: &str, cmd: Cmd, ignored: bool) -> &mut Batch {
        self.commands.push(Command {
            cmd,
            slot: slot(key),
            ignored,
        });
        self
    }

    /// How many distinct slots the batch touches (how many pipelines a cluster gets).
    #[cfg(test)]
    fn slots(&self) -> usize {
        let mut slots: Vec<u16> = self.commands.iter().map(|c| c.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.len()
    }

    /// Sends the batch; one reply per command not ignored, in order. An error in any part
    /// fails the whole batch (callers treat it as a miss).
    pub async fn query(&self, conn: &Conn) -> RedisResult<Vec<Value>> {
        if self.commands.is_empty() {
            return Ok(Vec::new());
        }
        match conn {
            Conn::Single(_) => {
                let indices: Vec<usize> = (0..self.commands.len()).collect();
                self.query_part(conn.clone(), &indices).await
            }
            Conn::Cluster(_) => {
                let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
                for (i, command) in self.commands.iter().enumerate() {
                    match groups.iter_mut().find(|(s, _)| *s == command.slot) {
                        Some((_, group)) => group.push(i),
                        None => groups.push((command.slot, vec![i])),
                    }
                }
                if groups.len() == 1 {
                    return self.query_part(conn.clone(), &groups[0].1).await;
                }
                let parts = try_join_all(
                    groups
                        .iter()
                        .map(|(_, group)| self.query_part(conn.clone(), group)),
                )
                .await?;
                let mut replies: Vec<Option<Value>> = vec![None; self.commands.len()];
                for ((_, group), part) in groups.iter().zip(parts) {
                    let kept = group.iter().filter(|&&i| !self.commands[i].ignored);
                    for (&i, value) in kept.zip(part) {
                        replies[i] = Some(value);
                    }
                }
                Ok(replies
                    .into_iter()
                    .zip(&self.commands)
                    .filter(|(_, c)| !c.ignored)
                    .map(|(v, _)| v.unwrap_or(Value::Nil))
                    .collect())
            }
        }
    }

    /// One pipeline of the commands at `indices`; the replies of those not ignored.
    async fn query_part(&self, mut conn: Conn, indices: &[usize]) -> RedisResult<Vec<Value>> {
        let mut pipe = redis::Pipeline::with_capacity(indices.len());
        for &i in indices {
            let command = &self.commands[i];
            pipe.add_command(command.cmd.clone());
            if command.ignored {
                pipe.ignore();
            }
        }
        pipe.query_async(&mut conn).await
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster_keyslot() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        // An empty tag hashes the whole key; the tag ends at the first `}`.
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
    }

    #[test]
    fn keys_sharing_a_tag_share_a_slot_and_others_spread() {
        assert_eq!(slot("gw:rate:{acme}:1"), slot("gw:gen:{acme}"));
        assert_ne!(slot("gw:v1:acme:{aa}"), slot("gw:v1:acme:{bb}"));
    }

    #[test]
    fn a_batch_counts_the_slots_it_touches() {
        let mut batch = Batch::new();
        batch
            .push("gw:v1:acme:{aa}", redis::cmd("GET"))
            .push("gw:rate:{acme}:1", redis::cmd("GET"))
            .push_ignored("gw:rate:{acme}:1", redis::cmd("EXPIRE"));
        assert_eq!(batch.slots(), 2);
    }
}
