//! Parallel: run a function over a stream of jobs on every core and hand the
//! results back in the order the jobs were made, so output never depends on timing.
//!
//! Both compressors (qcow2 clusters, LXC archive frames) use it: one producer
//! reads input, workers compress, and the caller's consumer writes in order.
//! At most a few jobs per thread are in flight (sent and not yet consumed),
//! so memory stays bounded however uneven the workers are.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// The sequence number a worker's failed `init` reports under: it ends the
/// run as soon as it arrives.
const INIT_FAILED: u64 = u64::MAX;

/// Jobs in flight per worker.
const WINDOW_PER_THREAD: usize = 4;

/// How many workers to run: one per core.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Run `work` over every job `produce` sends, on `threads` workers (each with
/// its own state from `init`), and pass the results to `consume` in the order
/// the jobs were sent. `send` returns false once the pipeline has stopped (a
/// worker or the consumer failed); the producer should then return. After a
/// job fails no new job starts; the error returned is the earliest failing
/// job's (in sending order), else the consumer's, else the producer's.
pub(crate) fn map_ordered<J, R, St>(
    threads: usize,
    produce: impl FnOnce(&mut dyn FnMut(J) -> bool) -> Result<()> + Send,
    init: impl Fn() -> Result<St> + Sync,
    work: impl Fn(&mut St, J) -> Result<R> + Sync,
    mut consume: impl FnMut(R) -> Result<()>,
) -> Result<()>
where
    J: Send,
    R: Send,
{
    let threads = threads.max(1);
    let (job_tx, job_rx) = sync_channel::<(u64, J)>(threads * 2);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = sync_channel::<(u64, Result<R>)>(threads * 2);
    let failed = AtomicBool::new(false);
    // One token per job in flight: the producer takes one before sending, the
    // consumer gives it back after consuming. When the consumer stops, the
    // producer's next take fails and it stops too.
    let window = threads * WINDOW_PER_THREAD;
    let (token_tx, token_rx) = sync_channel::<()>(window);
    for _ in 0..window {
        token_tx.send(()).expect("the receiver is alive");
    }
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut seq = 0u64;
            let mut send = |job: J| {
                if token_rx.recv().is_err() {
                    return false;
                }
                let ok = job_tx.send((seq, job)).is_ok();
                seq += 1;
                ok
            };
            produce(&mut send)
        });
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&job_rx);
                let tx = done_tx.clone();
                let (init, work, failed) = (&init, &work, &failed);
                s.spawn(move || worker(rx, tx, init, work, failed))
            })
            .collect();
        // Only the threads hold the queues now: when one side stops, the
        // others see a closed queue instead of waiting forever.
        drop(job_rx);
        drop(done_tx);
        let consumed = consume_in_order(done_rx, token_tx, &mut consume);
        let produced = producer.join().expect("producer thread panicked");
        for w in workers {
            w.join().expect("worker thread panicked");
        }
        consumed.and(produced)
    })
}

fn worker<J, R, St>(
    rx: Arc<Mutex<Receiver<(u64, J)>>>,
    tx: SyncSender<(u64, Result<R>)>,
    init: &impl Fn() -> Result<St>,
    work: &impl Fn(&mut St, J) -> Result<R>,
    failed: &AtomicBool,
) {
    let mut state = match init() {
        Ok(s) => s,
        Err(e) => {
            failed.store(true, Ordering::SeqCst);
            let _ = tx.send((INIT_FAILED, Err(e)));
            return;
        }
    };
    while !failed.load(Ordering::SeqCst) {
        let next = rx.lock().expect("job queue poisoned").recv();
        let Ok((seq, job)) = next else { return };
        // A panicking job fails like any other, so its turn still comes and
        // the run ends cleanly instead of waiting for it.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&mut state, job)))
            .unwrap_or_else(|_| Err(anyhow!("job {seq} panicked")));
        if r.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        if tx.send((seq, r)).is_err() {
            return;
        }
    }
}

/// Results arrive in any order; hand them on in sequence. An error ends the
/// run when its turn comes (every earlier job was taken before it, so their
/// results do come); dropping the receiver then stops the workers.
fn consume_in_order<R>(
    rx: Receiver<(u64, Result<R>)>,
    tokens: SyncSender<()>,
    consume: &mut impl FnMut(R) -> Result<()>,
) -> Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, r) in rx.iter() {
        if seq == INIT_FAILED {
            return r.map(|_| ());
        }
        pending.insert(seq, r);
        while let Some(r) = pending.remove(&next) {
            consume(r?)?;
            next += 1;
            let _ = tokens.try_send(());
        }
    }
    if !pending.is_empty() {
        return Err(anyhow!("a worker stopped before job {next} was done"));
    }
    Ok(())
}

/// Run `f` over `items` on up to `workers` threads. Results keep the input
/// order; after a failure no new item starts, and the earliest failing item's
/// error is returned.
pub(crate) fn map_slice<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    map_ordered(
        workers.min(items.len()),
        |send| {
            for item in items {
                if !send(item) {
                    break;
                }
            }
            Ok(())
        },
        || Ok(()),
        |_, item: &T| f(item),
        |r| {
            out.push(r);
            Ok(())
        },
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_job_order_whatever_the_timing() {
        let mut got = Vec::new();
        map_ordered(
            4,
            |send| {
                for i in 0..200u64 {
                    if !send(i) {
                        break;
                    }
                }
                Ok(())
            },
            || Ok(()),
            |_, i| {
                // Later jobs finish first now and then.
                std::thread::sleep(std::time::Duration::from_micros((200 - i) % 7 * 50));
                Ok(i * 2)
            },
            |r| {
                got.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, (0..200).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn map_slice_keeps_order_and_reports_the_earliest_failure() {
        let items: Vec<u32> = (0..20).collect();
        let out = map_slice(&items, 3, |i| Ok(i * 2)).unwrap();
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let err = map_slice(&items, 4, |i| {
            // The later failure happens first; the earlier one is reported.
            std::thread::sleep(std::time::Duration::from_millis(if *i == 5 {
                30
            } else {
                0
            }));
            if *i >= 5 {
                anyhow::bail!("item {i} failed")
            }
            Ok(*i)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 5 failed");
    }

    #[test]
    fn a_failing_init_ends_the_run() {
        let err = map_ordered(
            2,
            |send| {
                while send(0u8) {}
                Ok(())
            },
            || -> Result<()> { anyhow::bail!("no compressor") },
            |_, i| Ok(i),
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no compressor");
    }

    #[test]
    fn a_failing_job_stops_the_run_and_its_error_is_returned() {
        let mut consumed = 0;
        let err = map_ordered(
            2,
            |send| {
                for i in 0..10_000u64 {
                    if !send(i) {
                        return Ok(());
                    }
                }
                Ok(())
            },
            || Ok(()),
            |_, i| {
                if i == 50 {
                    anyhow::bail!("job {i} failed")
                }
                Ok(i)
            },
            |_| {
                consumed += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "job 50 failed");
        assert!(consumed <= 50);
    }

    #[test]
    fn a_failing_consumer_stops_the_producer() {
        let err = map_ordered(
            2,
            |send| {
                for i in 0..u64::MAX {
                    if !send(i) {
                        return Ok(());
                    }
                }
                Ok(())
            },
            || Ok(()),
            |_, i| Ok(i),
            |i| {
                if i == 3 {
                    anyhow::bail!("disk full")
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
    }

    #[test]
    fn a_panicking_job_fails_the_run_instead_of_hanging_it() {
        let err = map_ordered(
            2,
            |send| {
                for i in 0..1000u64 {
                    if !send(i) {
                        break;
                    }
                }
                Ok(())
            },
            || Ok(()),
            |_, i| {
                if i == 7 {
                    panic!("boom");
                }
                Ok(i)
            },
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "job 7 panicked");
    }

    #[test]
    fn jobs_in_flight_stay_within_the_window_when_one_job_is_slow() {
        use std::sync::atomic::AtomicU64;
        let sent = AtomicU64::new(0);
        let max_ahead = AtomicU64::new(0);
        let mut consumed = 0u64;
        map_ordered(
            2,
            |send| {
                for i in 0..300u64 {
                    sent.store(i + 1, Ordering::SeqCst);
                    if !send(i) {
                        break;
                    }
                }
                Ok(())
            },
            || Ok(()),
            |_, i| {
                if i == 10 {
                    // The other worker races ahead meanwhile.
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Ok(i)
            },
            |_| {
                consumed += 1;
                let ahead = sent.load(Ordering::SeqCst) - consumed;
                max_ahead.fetch_max(ahead, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(consumed, 300);
        assert!(max_ahead.load(Ordering::SeqCst) <= 2 * WINDOW_PER_THREAD as u64 + 1);
    }

    #[test]
    fn a_producer_error_is_returned() {
        let err = map_ordered(
            2,
            |send| {
                send(1u8);
                anyhow::bail!("cannot read input")
            },
            || Ok(()),
            |_, i| Ok(i),
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot read input");
    }
}
