//! The threads: one per data-path worker (a current-thread tokio runtime each), or
//! one multi-threaded runtime for all (`worker_model = "shared"`), and the control
//! thread (probes, drains, the admin API, metrics upkeep).

use std::io;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerModel;
use crate::proxy::busy;

/// Starts the worker threads and the control thread; returns the workers' runtime
/// handles and the control runtime's. Every thread returns when `stop` fires.
pub(super) fn spawn_threads(
    model: WorkerModel,
    workers: usize,
    busy_poll: Option<Duration>,
    stop: &CancellationToken,
) -> io::Result<(Vec<Handle>, Handle)> {
    let runtimes = match model {
        WorkerModel::PerCore => workers,
        WorkerModel::Shared => 1,
    };
    let mut handles = Vec::with_capacity(runtimes);
    for i in 0..runtimes {
        let rt = match model {
            WorkerModel::PerCore => {
                let mut b = tokio::runtime::Builder::new_current_thread();
                b.enable_all();
                if busy_poll.is_some() {
                    b.on_thread_unpark(busy::unparked);
                }
                b.build()?
            }
            WorkerModel::Shared => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("flowgate-worker")
                .enable_all()
                .build()?,
        };
        handles.push(rt.handle().clone());
        // Config refuses busy_poll with the shared model.
        let spin = busy_poll.filter(|_| model == WorkerModel::PerCore);
        // A per-core worker's sockets are registered with its own reactor.
        let reactor = match model {
            WorkerModel::PerCore => i + 1,
            WorkerModel::Shared => 0,
        };
        run_on_thread(format!("flowgate-w{i}"), rt, spin, reactor, stop.clone())?;
    }
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let control_handle = control.handle().clone();
    run_on_thread("flowgate-control".into(), control, None, 0, stop.clone())?;
    Ok((handles, control_handle))
}

fn run_on_thread(
    name: String,
    rt: tokio::runtime::Runtime,
    // `runtime.busy_poll`: the thread's spin task (see [`busy`]).
    spin: Option<Duration>,
    // See [`crate::proxy::set_reactor`].
    reactor: usize,
    stop: CancellationToken,
) -> io::Result<()> {
    std::thread::Builder::new().name(name).spawn(move || {
        crate::proxy::set_reactor(reactor);
        if let Some(budget) = spin {
            rt.spawn(busy::spin(budget));
        }
        rt.block_on(async {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = keep_wakeups_near() => {}
            }
        });
        rt.shutdown_timeout(Duration::from_millis(100));
    })?;
    Ok(())
}

/// How far ahead a runtime's driver always has a wake-up due.
const TICK: Duration = Duration::from_millis(250);

/// Keeps a timer due within [`TICK`] on the thread's runtime. tokio writes to its
/// eventfd to unpark the driver whenever a new timer is due before the driver's
/// next wake-up, even from the driver's own thread: without this, the connect
/// timeout of every backend connection (seconds ahead, but earlier than the
/// sessions' idle timeouts) cost a `write` system call and a spurious wake-up
/// (issue 12; `tests/syscalls.rs`). With a tick due sooner, a connect deadline is
/// never the earliest one. The price: four wake-ups a second on an idle thread.
async fn keep_wakeups_near() {
    loop {
        tokio::time::sleep(TICK).await;
    }
}
