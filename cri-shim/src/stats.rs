//! The CRI stats calls: ContainerStats, ListContainerStats, PodSandboxStats and
//! ListPodSandboxStats.
//!
//! A container's figures come from its cgroup v2 in the pod VM, read by the guest agent (its
//! Stats call): CPU time, memory in use (the working set too: the agent reports no inactive
//! file pages to subtract), the memory limit (`available_bytes` is what is left of it) and the
//! process count. A pod's CPU and memory are what its VM costs the host: the CPU time (user +
//! system, vCPUs included) and the resident memory of its `crx-vmm` process from
//! `/proc/<vmm pid>/stat`, so they include the guest kernel, the agent and the guest's page
//! cache, which no container's cgroup sees; `available_bytes` is what is left of the VM's
//! memory. A pod's process count is the sum of its containers'. CPU rates
//! (`usage_nano_cores`) are taken against the previous sample of the same container or pod
//! ([`CpuSamples`]): the first sample has none.
//!
//! The lists hold the running containers of ready pods (and the ready pods) that pass the
//! filter; a pod whose agent does not answer is left out. ContainerStats of a created
//! container answers zeros (as containerd does), of an exited one FailedPrecondition;
//! PodSandboxStats of a pod that is not ready is FailedPrecondition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use crx_agent_proto::ContainerStats as Usage;
use crx_runtime::sandbox::Sandbox;
use k8s_cri::v1 as cri;
use tonic::Status;

use crate::containers::{container_matches, container_metadata};
use crate::errors::agent_status;
use crate::pods::{pod_matches, pod_metadata, Runtime};
use crate::records::{now_ns, ContainerRecord, ContainerState, PodRecord};

/// The shortest time between two samples a rate is kept for: a sample closer to the kept one
/// gets a rate against it but does not replace it, so that close calls (two clients polling)
/// do not make rates of a few clock ticks.
const MIN_SAMPLE_INTERVAL_NS: i64 = 1_000_000_000;

/// A cumulative CPU time and when it was read, both in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at_ns: i64,
    cpu_ns: u64,
}

/// The last kept CPU sample of each container and pod, by ID.
#[derive(Default)]
pub struct CpuSamples(Mutex<HashMap<String, Sample>>);

impl CpuSamples {
    /// Records that `id` had used `cpu_ns` of CPU at `at_ns`; returns its rate since the kept
    /// sample in nanocores (billionths of a core), if there is one.
    fn rate(&self, id: &str, at_ns: i64, cpu_ns: u64) -> Option<u64> {
        let mut samples = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let new = Sample { at_ns, cpu_ns };
        let Some(kept) = samples.get(id).copied() else {
            samples.insert(id.to_owned(), new);
            return None;
        };
        let elapsed = at_ns - kept.at_ns;
        if elapsed >= MIN_SAMPLE_INTERVAL_NS || cpu_ns < kept.cpu_ns {
            samples.insert(id.to_owned(), new);
        }
        let elapsed = u64::try_from(elapsed).ok().filter(|e| *e > 0)?;
        let used = cpu_ns.checked_sub(kept.cpu_ns)?;
        Some((u128::from(used) * 1_000_000_000 / u128::from(elapsed)) as u64)
    }

    /// Forgets the samples of the IDs `keep` refuses.
    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| keep(id));
    }
}

impl Runtime {
    /// ContainerStats.
    pub fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, Status> {
        let record = self.container(id)?;
        match record.state() {
            ContainerState::Created => {
                Ok(container_stats(&record, &Usage::default(), now_ns(), None))
            }
            ContainerState::Exited => Err(Status::failed_precondition(format!(
                "container {} is not running: it has no stats",
                record.id
            ))),
            ContainerState::Running => {
                let (_, usage, at) = self.usage_in(&record.pod_id)?;
                let usage = usage.get(&record.id).ok_or_else(|| {
                    Status::not_found(format!("the pod's agent has no container {}", record.id))
                })?;
                Ok(self.sampled(&record, usage, at))
            }
        }
    }

    /// ListContainerStats: the running containers of ready pods that pass `filter`.
    pub fn list_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Vec<cri::ContainerStats> {
        let filter = filter.unwrap_or_default();
        let mut by_pod: BTreeMap<String, Vec<ContainerRecord>> = BTreeMap::new();
        for c in self.records().containers.values().filter(|c| {
            c.state() == ContainerState::Running
                && container_matches(
                    c,
                    &filter.id,
                    &filter.pod_sandbox_id,
                    &filter.label_selector,
                )
        }) {
            by_pod.entry(c.pod_id.clone()).or_default().push(c.clone());
        }
        self.forget_removed();
        by_pod
            .into_iter()
            .filter_map(|(pod, containers)| match self.usage_in(&pod) {
                Ok((_, usage, at)) => Some(
                    containers
                        .into_iter()
                        .filter_map(|c| usage.get(&c.id).map(|u| self.sampled(&c, u, at)))
                        .collect::<Vec<_>>(),
                ),
                Err(e) => {
                    tracing::debug!(pod, "no container stats: {}", e.message());
                    None
                }
            })
            .flatten()
            .collect()
    }

    /// PodSandboxStats.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats, Status> {
        let pod = {
            let records = self.records();
            let id = records.pod_id(id)?;
            records.pods[&id].clone()
        };
        self.pod_stats(&pod)
    }

    /// ListPodSandboxStats: the ready pods that pass `filter`.
    pub fn list_pod_sandbox_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Vec<cri::PodSandboxStats> {
        let filter = filter.unwrap_or_default();
        let pods: Vec<PodRecord> = self
            .records()
            .pods
            .values()
            .filter(|p| !p.stopped && pod_matches(p, &filter.id, &filter.label_selector))
            .cloned()
            .collect();
        self.forget_removed();
        pods.iter()
            .filter_map(|pod| {
                self.pod_stats(pod)
                    .map_err(|e| tracing::debug!(pod = pod.id, "no pod stats: {}", e.message()))
                    .ok()
            })
            .collect()
    }

    /// The stats of pod `pod`: its VM's cost, its running containers.
    fn pod_stats(&self, pod: &PodRecord) -> Result<cri::PodSandboxStats, Status> {
        let not_ready =
            || Status::failed_precondition(format!("pod sandbox {} is not ready", pod.id));
        if pod.stopped {
            return Err(not_ready());
        }
        let (sandbox, usage, at) = self.usage_in(&pod.id)?;
        let state = sandbox.state();
        let (vm_cpu_ns, vm_rss) = process_usage(state.vmm_pid).ok_or_else(not_ready)?;
        let running: Vec<ContainerRecord> = self
            .records()
            .containers_of(&pod.id)
            .filter(|c| c.state() == ContainerState::Running)
            .cloned()
            .collect();
        let containers = running
            .iter()
            .filter_map(|c| usage.get(&c.id).map(|u| self.sampled(c, u, at)))
            .collect();
        Ok(cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: pod.id.clone(),
                metadata: Some(pod_metadata(pod)),
                labels: pod.labels.clone().into_iter().collect(),
                annotations: pod.annotations.clone().into_iter().collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cpu_usage(
                    at,
                    vm_cpu_ns,
                    self.cpu_samples.rate(&pod.id, at, vm_cpu_ns),
                )),
                memory: Some(memory_usage(at, vm_rss, u64::from(state.mem_mib) << 20)),
                network: None,
                process: Some(cri::ProcessUsage {
                    timestamp: at,
                    process_count: Some(value(usage.values().map(|u| u.pids_current).sum())),
                }),
                containers,
            }),
            windows: None,
        })
    }

    /// The running sandbox of pod `pod` and the usage of each of its containers (by ID) as its
    /// agent reads it now, and when.
    fn usage_in(&self, pod: &str) -> Result<(Sandbox, HashMap<String, Usage>, i64), Status> {
        let (sandbox, mut agent) = self.agent_of(pod)?;
        let reply = agent.stats(&[]).map_err(agent_status)?;
        let at = now_ns();
        let usage = reply
            .containers
            .into_iter()
            .map(|u| (u.container_id.clone(), u))
            .collect();
        Ok((sandbox, usage, at))
    }

    /// The stats of running container `record` from `usage`, read at `at`, with its CPU rate.
    fn sampled(&self, record: &ContainerRecord, usage: &Usage, at: i64) -> cri::ContainerStats {
        let rate = self
            .cpu_samples
            .rate(&record.id, at, cpu_ns(usage.cpu_usage_usec));
        container_stats(record, usage, at, rate)
    }

    /// Drops the CPU samples of removed containers and pods.
    fn forget_removed(&self) {
        let ids: HashSet<String> = {
            let records = self.records();
            records
                .pods
                .keys()
                .chain(records.containers.keys())
                .cloned()
                .collect()
        };
        self.cpu_samples.retain(|id| ids.contains(id));
    }
}

fn value(value: u64) -> cri::UInt64Value {
    cri::UInt64Value { value }
}

fn cpu_ns(usec: u64) -> u64 {
    usec.saturating_mul(1000)
}

fn cpu_usage(at: i64, used_ns: u64, rate: Option<u64>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: Some(value(used_ns)),
        usage_nano_cores: rate.map(value),
    }
}

/// Memory in use (`used`, the working set too) and what is left of `limit` (0: no limit).
fn memory_usage(at: i64, used: u64, limit: u64) -> cri::MemoryUsage {
    cri::MemoryUsage {
        timestamp: at,
        working_set_bytes: Some(value(used)),
        available_bytes: (limit > 0).then(|| value(limit.saturating_sub(used))),
        usage_bytes: Some(value(used)),
        rss_bytes: None,
        page_faults: None,
        major_page_faults: None,
    }
}

fn container_stats(
    record: &ContainerRecord,
    usage: &Usage,
    at: i64,
    rate: Option<u64>,
) -> cri::ContainerStats {
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: record.id.clone(),
            metadata: Some(container_metadata(record)),
            labels: record.labels.clone().into_iter().collect(),
            annotations: record.annotations.clone().into_iter().collect(),
        }),
        cpu: Some(cpu_usage(at, cpu_ns(usage.cpu_usage_usec), rate)),
        memory: Some(memory_usage(
            at,
            usage.memory_usage_bytes,
            usage.memory_limit_bytes,
        )),
        writable_layer: None,
        swap: None,
    }
}

/// The CPU time (user + system, nanoseconds) and resident memory (bytes) of process `pid`,
/// from `/proc/<pid>/stat`.
fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = procfs::process::Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .stat()
        .ok()?;
    let ticks = stat.utime.checked_add(stat.stime)?;
    let hz = procfs::ticks_per_second().max(1);
    Some((
        (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64,
        stat.rss.saturating_mul(procfs::page_size()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_kept_sample() {
        let samples = CpuSamples::default();
        let s = 1_000_000_000;
        assert_eq!(samples.rate("c", 10 * s, 0), None);
        // Half a core over two seconds.
        assert_eq!(samples.rate("c", 12 * s, s as u64), Some(500_000_000));
        // Too close to keep: rated against the kept sample, which stays.
        assert_eq!(
            samples.rate("c", 12 * s + s / 10, s as u64 + 50_000_000),
            Some(500_000_000)
        );
        assert_eq!(samples.rate("c", 13 * s, 2 * s as u64), Some(1_000_000_000));
        // A counter that went back (a new container under the same ID) starts over.
        assert_eq!(samples.rate("c", 14 * s, 0), None);
        assert_eq!(samples.rate("c", 16 * s, s as u64), Some(500_000_000));
        samples.retain(|id| id != "c");
        assert_eq!(samples.rate("c", 17 * s, s as u64), None);
    }

    #[test]
    fn process_usage_reads_proc_stat() {
        let (_, rss) = process_usage(std::process::id()).unwrap();
        assert!(rss > 0);
        // CPU time counts in clock ticks: spin until this process has used one.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut spins = 0u64;
        while process_usage(std::process::id()).unwrap().0 == 0 {
            assert!(std::time::Instant::now() < give_up, "no CPU time counted");
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        assert_eq!(process_usage(u32::MAX), None);
    }
}
