//! The Lua scripts of the Redis store. Each touches only its `KEYS` (one key), so it runs
//! unchanged on a Redis Cluster.

/// Extends (ARGV[2] ms > 0) or releases (0) the lock at KEYS[1], only while ARGV[1] holds it.
pub(super) const KEEP_FLIGHT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1";

/// Deletes the entry at KEYS[1] if its envelope's purge generation (absent = 0) is below
/// ARGV[1]; 1 if it did. An entry is `<envelope JSON>\n<body>` (`common::entry`).
pub(super) const UNLINK_OLDER: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local nl = string.find(v, '\n', 1, true)
local ok, env = pcall(cjson.decode, string.sub(v, 1, (nl or 1) - 1))
local g = 0
if ok and type(env) == 'table' then g = tonumber(env['generation']) or 0 end
if g < tonumber(ARGV[1]) then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0";
