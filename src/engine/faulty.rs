//! Test-only fault injection (cargo feature `fault-injection`, never in release builds):
//! reads and writes touching the byte range in `VUBLK_FAULT_EIO=START-END` fail with EIO, as a
//! failing disk would. Used where no real failing device can be had (no device-mapper here).

use std::io;
use std::ops::Range;

use super::{Completion, Engine, EngineInfo, EngineQueue, Op};

pub struct Faulty {
    inner: Box<dyn Engine>,
    bad: Range<u64>,
}

impl Faulty {
    /// Wraps `inner` if `VUBLK_FAULT_EIO` is set to `START-END`.
    pub fn wrap(inner: Box<dyn Engine>) -> Box<dyn Engine> {
        let bad = std::env::var("VUBLK_FAULT_EIO").ok().and_then(|v| {
            let (a, b) = v.split_once('-')?;
            Some(a.parse().ok()?..b.parse().ok()?)
        });
        match bad {
            Some(bad) => {
                log::warn!("fault injection: EIO for I/O touching bytes {bad:?}");
                Box::new(Faulty { inner, bad })
            }
            None => inner,
        }
    }
}

impl Engine for Faulty {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn info(&self) -> &EngineInfo {
        self.inner.info()
    }
    fn size_granularity(&self) -> u64 {
        self.inner.size_granularity()
    }
    fn new_queue(&self) -> io::Result<Box<dyn EngineQueue>> {
        Ok(Box::new(FaultyQueue {
            inner: self.inner.new_queue()?,
            bad: self.bad.clone(),
            failed: Vec::new(),
        }))
    }
    fn sync_all(&self) -> io::Result<()> {
        self.inner.sync_all()
    }
}

struct FaultyQueue {
    inner: Box<dyn EngineQueue>,
    bad: Range<u64>,
    failed: Vec<Completion>,
}

impl EngineQueue for FaultyQueue {
    fn submit(&mut self, tag: u64, op: Op) {
        let hit = match &op {
            Op::Read { offset, bufs } | Op::Write { offset, bufs, .. } => {
                *offset < self.bad.end && self.bad.start < offset + bufs.len()
            }
            _ => false,
        };
        if hit {
            self.failed.push(Completion {
                tag,
                result: Err(io::Error::from_raw_os_error(libc::EIO)),
            });
        } else {
            self.inner.submit(tag, op);
        }
    }
    fn commit(&mut self) {
        self.inner.commit();
    }
    fn wait(&mut self) {
        self.inner.wait();
    }
    fn has_completions(&mut self) -> bool {
        !self.failed.is_empty() || self.inner.has_completions()
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.failed);
        self.inner.reap(out);
    }
    fn reap_max(&mut self, out: &mut Vec<Completion>, max: usize) {
        let n = max.min(self.failed.len());
        out.extend(self.failed.drain(..n));
        if n < max {
            self.inner.reap_max(out, max - n);
        }
    }
    fn clear_completion_event(&mut self) {
        self.inner.clear_completion_event();
    }
    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.completion_fd()
    }
}
