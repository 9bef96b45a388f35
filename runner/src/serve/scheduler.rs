//! The one scheduler of `runner serve`: every job — GitLab or GitHub — takes a `Slot` before
//! its VM starts and holds it until the VM is gone. A slot is one of `concurrent` places and
//! the job's memory (guest RAM + QEMU overhead) out of the host's VM budget
//! (`capacity::HostResources`), so the service never starts more VMs than memory allows.
//!
//! **Fairness.** There is one queue: GitHub jobs and GitLab pollers alike wait in
//! [`Scheduler::acquire`] (tokio's semaphores are FIFO), so a freed slot goes to whoever asked
//! first. A GitLab poller takes its slot *before* asking GitLab for a job, because GitLab
//! assigns the job with its answer: a job handed over must have a VM place ready, never wait
//! in a queue of ours while GitLab thinks it runs. The price is that a poller holds a slot
//! for the length of one request (a long poll, at most the client's 70 s timeout) even when
//! no job comes; it then frees the slot and queues again at the back — behind any GitHub job
//! that arrived meanwhile. So a GitHub job waits at most one GitLab request per poller ahead
//! of it, never indefinitely; and a poller never skips the queue (it used to `try_acquire`
//! every `check_interval`, losing every freed slot to a waiting GitHub job under load).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::capacity::{HostResources, QEMU_OVERHEAD_MIB};

#[derive(Debug)]
pub struct Scheduler {
    places: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    memory_budget_mib: u32,
    concurrent: usize,
}

/// Permission to run one VM; dropping it frees the place and the memory.
#[derive(Debug)]
pub struct Slot {
    _place: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

impl Scheduler {
    /// `concurrent` VMs at most (at least 1), within `host`'s memory budget.
    pub fn new(concurrent: usize, host: HostResources) -> Self {
        let concurrent = concurrent.max(1);
        // At least one VM's worth, so a small host still runs jobs one at a time.
        let budget = host.vm_budget_mib().clamp(1, u32::MAX as u64 / 2) as u32;
        Scheduler {
            places: Arc::new(Semaphore::new(concurrent)),
            memory: Arc::new(Semaphore::new(budget as usize)),
            memory_budget_mib: budget,
            concurrent,
        }
    }

    pub fn concurrent(&self) -> usize {
        self.concurrent
    }

    /// MiB a VM of `memory_mib` counts against the budget (capped at the whole budget: a VM
    /// larger than the budget runs alone rather than never).
    fn cost(&self, memory_mib: u32) -> u32 {
        (memory_mib as u64 + QEMU_OVERHEAD_MIB).min(self.memory_budget_mib as u64) as u32
    }

    /// Waits for a place and the memory of a VM with `memory_mib` of RAM.
    pub async fn acquire(&self, memory_mib: u32) -> Slot {
        // Place first: the memory semaphore is only contended by jobs that have a place.
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .expect("scheduler semaphores are never closed");
        let memory = self
            .memory
            .clone()
            .acquire_many_owned(self.cost(memory_mib))
            .await
            .expect("scheduler semaphores are never closed");
        Slot {
            _place: place,
            _memory: memory,
        }
    }

    /// A slot if one is free right now, skipping the queue: for tests only, since the
    /// service's users all wait their turn in [`Scheduler::acquire`].
    #[cfg(test)]
    pub fn try_acquire(&self, memory_mib: u32) -> Option<Slot> {
        let place = self.places.clone().try_acquire_owned().ok()?;
        let memory = self
            .memory
            .clone()
            .try_acquire_many_owned(self.cost(memory_mib))
            .ok()?;
        Some(Slot {
            _place: place,
            _memory: memory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(available_mib: u64) -> HostResources {
        HostResources {
            cores: 2,
            available_mib,
        }
    }

    #[test]
    fn concurrent_caps_slots() {
        let s = Scheduler::new(2, host(64 * 1024));
        let a = s.try_acquire(1024).unwrap();
        let _b = s.try_acquire(1024).unwrap();
        assert!(s.try_acquire(1024).is_none());
        drop(a);
        assert!(s.try_acquire(1024).is_some());
    }

    #[test]
    fn memory_caps_slots() {
        // Budget for two 1 GiB VMs (each counts 1280 MiB) but not three.
        let s = Scheduler::new(10, host(1024 + 2 * 1280 + 500));
        let _a = s.try_acquire(1024).unwrap();
        let _b = s.try_acquire(1024).unwrap();
        assert!(s.try_acquire(1024).is_none());
        // A failed memory claim must not keep the place it took.
        assert_eq!(s.places.available_permits(), 8);
    }

    #[test]
    fn oversized_vm_runs_alone() {
        let s = Scheduler::new(4, host(1024 + 1000));
        let a = s.try_acquire(8192).unwrap();
        assert!(s.try_acquire(128).is_none());
        drop(a);
        assert!(s.try_acquire(128).is_some());
    }
}
