//! A batch of commands sent in as few round trips as the deployment allows: one pipeline on a
//! single node; on a cluster, one pipeline per hash slot, all sent concurrently (a pipeline
//! must not span slots there). Replies come back in the order the commands were added.

use futures_util::future::try_join_all;
use redis::{Cmd, RedisResult, Value};

use super::conn::Conn;

/// Redis Cluster has 16384 slots.
const SLOTS: u16 = 16384;

struct Command<'k> {
    cmd: Cmd,
    /// The key that places it: hashed to a slot only on a cluster (a single node needs no
    /// slot, and the hash was ~400 instructions a command on every hit).
    key: &'k str,
    /// The reply is dropped (an `EXPIRE` riding along with its `INCRBY`).
    ignored: bool,
}

/// Commands, each with the key that places it (borrowed until the batch is sent).
#[derive(Default)]
pub struct Batch<'k> {
    commands: Vec<Command<'k>>,
}

impl<'k> Batch<'k> {
    pub fn new() -> Batch<'k> {
        Batch::default()
    }

    /// Adds `cmd`, which touches only `key` (or keys of its slot); its reply is returned.
    pub fn push(&mut self, key: &'k str, cmd: Cmd) -> &mut Batch<'k> {
        self.add(key, cmd, false)
    }

    /// Adds `cmd` whose reply is not returned.
    pub fn push_ignored(&mut self, key: &'k str, cmd: Cmd) -> &mut Batch<'k> {
        self.add(key, cmd, true)
    }

    fn add(&mut self, key: &'k str, cmd: Cmd, ignored: bool) -> &mut Batch<'k> {
        self.commands.push(Command { cmd, key, ignored });
        self
    }

    /// How many distinct slots the batch touches (how many pipelines a cluster gets).
    #[cfg(test)]
    fn slots(&self) -> usize {
        let mut slots: Vec<u16> = self.commands.iter().map(|c| slot(c.key)).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.len()
    }

    /// Sends the batch; one reply per command not ignored, in order. An error in any part
    /// fails the whole batch (callers treat it as a miss). Consumes the batch: its commands
    /// move into their pipelines rather than being copied there.
    pub async fn query(self, conn: &Conn) -> RedisResult<Vec<Value>> {
        if self.commands.is_empty() {
            return Ok(Vec::new());
        }
        match conn {
            Conn::Single(_) => query_part(conn.clone(), self.commands).await,
            Conn::Cluster(_) => {
                // Per slot: the commands, and the positions of their kept replies.
                let mut groups: Vec<(u16, Vec<Command>, Vec<usize>)> = Vec::new();
                let mut kept = 0;
                for command in self.commands {
                    let at = (!command.ignored).then(|| {
                        kept += 1;
                        kept - 1
                    });
                    let slot = slot(command.key);
                    let group = match groups.iter().position(|(s, _, _)| *s == slot) {
                        Some(g) => &mut groups[g],
                        None => {
                            groups.push((slot, Vec::new(), Vec::new()));
                            let last = groups.len() - 1;
                            &mut groups[last]
                        }
                    };
                    group.2.extend(at);
                    group.1.push(command);
                }
                if groups.len() == 1 {
                    let (_, commands, _) = groups.swap_remove(0);
                    return query_part(conn.clone(), commands).await;
                }
                let (commands, positions): (Vec<_>, Vec<_>) =
                    groups.into_iter().map(|(_, c, p)| (c, p)).unzip();
                let parts =
                    try_join_all(commands.into_iter().map(|c| query_part(conn.clone(), c))).await?;
                let mut replies: Vec<Value> = vec![Value::Nil; kept];
                for (positions, part) in positions.iter().zip(parts) {
                    for (&at, value) in positions.iter().zip(part) {
                        replies[at] = value;
                    }
                }
                Ok(replies)
            }
        }
    }
}

/// One pipeline of `commands`; the replies of those not ignored.
async fn query_part(mut conn: Conn, commands: Vec<Command<'_>>) -> RedisResult<Vec<Value>> {
    let mut pipe = redis::Pipeline::with_capacity(commands.len());
    for command in commands {
        pipe.add_command(command.cmd);
        if command.ignored {
            pipe.ignore();
        }
    }
    pipe.query_async(&mut conn).await
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
