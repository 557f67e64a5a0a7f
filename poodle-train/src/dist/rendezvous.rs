//! How the ranks of a job find each other without a server of ours: through files in a
//! folder every rank can read (the run directory on the cluster's shared filesystem).
//!
//! NCCL needs one 128-byte unique id made by rank 0 on every rank before its communicator
//! can form. Rank 0 writes it (atomically) to `<dir>/rendezvous-<job>/id`; every rank reads
//! it, then leaves a marker `rank-<r>` and waits for the markers of all ranks, so a rank that
//! never starts (a dead node, a wrong `--ntasks`) stops the job on every rank with its
//! number instead of NCCL waiting forever. Rank 0 removes the folder once the engine has
//! joined ([`FileRendezvous::finish`]).
//!
//! `<job>` comes from the launcher (Slurm's job and step, torchrun's run id, PMIx's
//! namespace, or `POODLE_RENDEZVOUS_KEY`), so two jobs sharing a run directory never read
//! each other's id. A requeued Slurm job keeps its job id: an id written before this rank
//! started by more than the timeout is a stale leftover and is not taken.

use super::{DistError, Result};
use poodle_common::atomic::write_atomic;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Variables that name one launch, most specific first; the key joins those that are set.
const JOB_KEYS: [&[&str]; 4] = [
    &["POODLE_RENDEZVOUS_KEY"],
    &["SLURM_JOB_ID", "SLURM_STEP_ID"],
    &["TORCHELASTIC_RUN_ID"],
    &["PMIX_NAMESPACE"],
];

/// The key of this launch, from a variable lookup (see the module doc).
pub fn job_key(get: impl Fn(&str) -> Option<String>) -> Result<String> {
    for names in JOB_KEYS {
        let parts: Vec<String> = names.iter().filter_map(|n| get(n)).collect();
        if !parts.is_empty() {
            let key: String = parts
                .join("-")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            return Ok(key);
        }
    }
    Err(DistError::Env(format!(
        "no job identity for the rendezvous: none of {} is set (set POODLE_RENDEZVOUS_KEY to \
         one value shared by every rank of this launch)",
        JOB_KEYS.concat().join(", ")
    )))
}

pub struct FileRendezvous {
    dir: PathBuf,
    rank: usize,
    world: usize,
    timeout: Duration,
    poll: Duration,
}

impl FileRendezvous {
    /// The rendezvous of job `key` under `root` (created by rank 0 when missing).
    pub fn new(root: &Path, key: &str, rank: usize, world: usize, timeout: Duration) -> Self {
        FileRendezvous {
            dir: root.join(format!("rendezvous-{key}")),
            rank,
            world,
            timeout,
            poll: Duration::from_millis(100),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rank 0 publishes `payload` (other ranks pass `None`); every rank gets rank 0's bytes
    /// once all ranks have arrived.
    pub fn exchange(&self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        let started = now_ms();
        let id = self.dir.join("id");
        let bytes = match (self.rank, payload) {
            (0, Some(p)) => {
                // A leftover of a crashed launch with the same key goes first.
                let _ = std::fs::remove_dir_all(&self.dir);
                std::fs::create_dir_all(&self.dir).map_err(|e| self.io("create", &self.dir, e))?;
                write_atomic(&id, &encode(started, p))
                    .map_err(|e| self.fail(format!("writing {}: {e:#}", id.display())))?;
                p.to_vec()
            }
            (0, None) => return Err(self.fail("rank 0 has no payload to publish".into())),
            _ => self.wait_for_id(&id, started)?,
        };
        let marker = self.dir.join(format!("rank-{}", self.rank));
        write_atomic(&marker, b"joined")
            .map_err(|e| self.fail(format!("writing {}: {e:#}", marker.display())))?;
        self.wait_for_ranks()?;
        Ok(bytes)
    }

    /// Rank 0 removes the folder (call it once the engine has formed on every rank).
    pub fn finish(&self) {
        if self.rank == 0 {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn wait_for_id(&self, path: &Path, started: u64) -> Result<Vec<u8>> {
        let oldest = started.saturating_sub(self.timeout.as_millis() as u64);
        self.wait(|| match std::fs::read(path) {
            Ok(raw) => match decode(&raw) {
                Some((written, p)) if written >= oldest => Some(p),
                _ => None,
            },
            Err(_) => None,
        })
        .ok_or_else(|| {
            self.fail(format!(
                "no id from rank 0 at {} after {} s (is rank 0 running, with the same run \
                 directory on a filesystem every node sees?)",
                path.display(),
                self.timeout.as_secs()
            ))
        })
    }

    fn wait_for_ranks(&self) -> Result<()> {
        let missing = || -> Vec<usize> {
            (0..self.world)
                .filter(|r| !self.dir.join(format!("rank-{r}")).exists())
                .collect()
        };
        if self.wait(|| missing().is_empty().then_some(())).is_some() {
            return Ok(());
        }
        let m = missing();
        let shown: Vec<String> = m.iter().take(16).map(|r| r.to_string()).collect();
        Err(self.fail(format!(
            "{} of {} ranks did not join within {} s: rank{} {}{}",
            m.len(),
            self.world,
            self.timeout.as_secs(),
            if m.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if m.len() > shown.len() { ", ..." } else { "" }
        )))
    }

    /// Polls `ready` until it gives a value or the timeout passes.
    fn wait<T>(&self, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
        let end = std::time::Instant::now() + self.timeout;
        loop {
            if let Some(v) = ready() {
                return Some(v);
            }
            if std::time::Instant::now() >= end {
                return None;
            }
            std::thread::sleep(self.poll);
        }
    }

    fn fail(&self, msg: String) -> DistError {
        DistError::Rendezvous(format!(
            "rank {} of {}, rendezvous {}: {msg}",
            self.rank,
            self.world,
            self.dir.display()
        ))
    }

    fn io(&self, what: &str, path: &Path, e: std::io::Error) -> DistError {
        self.fail(format!("cannot {what} {}: {e}", path.display()))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `written-at-ms` as 8 little-endian bytes, then the payload.
fn encode(written: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = written.to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn decode(raw: &[u8]) -> Option<(u64, Vec<u8>)> {
    let head: [u8; 8] = raw.get(..8)?.try_into().ok()?;
    Some((u64::from_le_bytes(head), raw[8..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder per test (the crate's tests use the system temp dir, per process).
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("poodle-rdv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rdv(root: &Path, rank: usize, world: usize, ms: u64) -> FileRendezvous {
        let mut r = FileRendezvous::new(root, "job1", rank, world, Duration::from_millis(ms));
        r.poll = Duration::from_millis(5);
        r
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let root = scratch("all");
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|rank| {
                    let root = root.as_path();
                    s.spawn(move || {
                        // Late starters: rank 0 comes last, so the others must wait for it.
                        std::thread::sleep(Duration::from_millis(20 * (3 - rank as u64)));
                        let payload = [7u8, 1, 2, 255];
                        rdv(root, rank, 4, 5000)
                            .exchange((rank == 0).then_some(&payload[..]))
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &[7u8, 1, 2, 255]), "{got:?}");
        let r0 = rdv(root.as_path(), 0, 4, 10);
        assert!(r0.dir().exists());
        r0.finish();
        assert!(
            !r0.dir().exists(),
            "rank 0 cleans up after the engine joined"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_rank_is_named_on_every_rank_that_came() {
        let root = scratch("missing");
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = [0usize, 1, 3]
                .into_iter()
                .map(|rank| {
                    let root = root.as_path();
                    s.spawn(move || {
                        rdv(root, rank, 4, 300)
                            .exchange((rank == 0).then_some(&b"id"[..]))
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (e, rank) in errs.iter().zip([0, 1, 3]) {
            assert!(e.contains(&format!("rank {rank} of 4")), "{e}");
            assert!(
                e.contains("1 of 4 ranks did not join") && e.ends_with("rank 2"),
                "{e}"
            );
            assert!(e.contains("rendezvous-job1"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn without_rank_zero_the_others_stop_naming_the_id_file() {
        let root = scratch("norank0");
        let e = rdv(root.as_path(), 2, 3, 200).exchange(None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("rank 2 of 3") && msg.contains("no id from rank 0"),
            "{msg}"
        );
        assert!(msg.contains(
            &root
                .as_path()
                .join("rendezvous-job1/id")
                .display()
                .to_string()
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_stale_id_of_an_earlier_launch_is_not_taken() {
        let root = scratch("stale");
        let r1 = rdv(root.as_path(), 1, 2, 300);
        std::fs::create_dir_all(r1.dir()).unwrap();
        // Written an hour ago by a launch with the same key that crashed during set-up.
        let old = encode(now_ms() - 3_600_000, b"old");
        std::fs::write(r1.dir().join("id"), old).unwrap();
        assert!(r1.exchange(None).unwrap_err().to_string().contains("no id"));
        // A fresh one is taken (rank 0's marker is there too).
        std::fs::write(r1.dir().join("id"), encode(now_ms(), b"new")).unwrap();
        std::fs::write(r1.dir().join("rank-0"), b"joined").unwrap();
        assert_eq!(r1.exchange(None).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_job_key_comes_from_the_launcher() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[("SLURM_JOB_ID", "4242"), ("SLURM_STEP_ID", "0")]);
        assert_eq!(job_key(slurm).unwrap(), "4242-0");
        let torchrun = env(&[("TORCHELASTIC_RUN_ID", "a1/b:2")]);
        assert_eq!(job_key(torchrun).unwrap(), "a1_b_2");
        let own = env(&[("POODLE_RENDEZVOUS_KEY", "x"), ("SLURM_JOB_ID", "1")]);
        assert_eq!(job_key(own).unwrap(), "x");
        let e = job_key(env(&[])).unwrap_err().to_string();
        assert!(e.contains("POODLE_RENDEZVOUS_KEY"), "{e}");
    }
}
