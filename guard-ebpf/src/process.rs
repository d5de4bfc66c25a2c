//! Process tracking for attribution: exec (with arguments) and fork of
//! processes in guarded cgroups. Userspace builds the process tree from these
//! records as they happen, so a lookup by a process that exits at once (the
//! usual case for a refused lookup) still gets its full chain.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::bpf_probe_read_user_str,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use guard_common::event::{
    EventKind, ExecEvent, ExecResultEvent, ForkEvent, ARGS_CAP, MAX_ARGS, PATH_CAP,
};

use crate::maps::{binding_of_current, count_for, fork_child_pid_offset, EVENTS};
use guard_common::maps::{Binding, Counter};

// Offsets in the syscall tracepoint records; stable across kernels.
const EXECVE_FILENAME: usize = 16;
const EXECVE_ARGV: usize = 24;
const EXIT_RET: usize = 16;

#[inline(always)]
fn current_binding() -> Option<Binding> {
    binding_of_current()
}

#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn exec_enter(ctx: TracePointContext) -> u32 {
    if let Some(binding) = current_binding() {
        record_exec(&ctx, &binding);
    }
    0
}

#[inline(always)]
fn record_exec(ctx: &TracePointContext, binding: &Binding) {
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_for(binding, Counter::EventsLost);
        return;
    };
    let event = unsafe { &mut *entry.as_mut_ptr() };
    let pid_tgid = bpf_get_current_pid_tgid();
    event.kind = EventKind::Exec as u8;
    event._pad = [0; 3];
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.argc = 0;
    event.args_len = 0;
    event.args_truncated = 0;
    event.policy_id = binding.policy_id;
    event.path[0] = 0;
    let filename: u64 = unsafe { ctx.read_at(EXECVE_FILENAME) }.unwrap_or(0);
    let argv: u64 = unsafe { ctx.read_at(EXECVE_ARGV) }.unwrap_or(0);
    unsafe {
        bpf_probe_read_user_str(
            event.path.as_mut_ptr() as *mut c_void,
            PATH_CAP as u32,
            filename as *const c_void,
        )
    };
    let mut used: u32 = 0;
    let mut i = 0;
    while i < MAX_ARGS {
        let arg: u64 = match unsafe { bpf_probe_read_user((argv as *const u64).wrapping_add(i)) } {
            Ok(arg) => arg,
            Err(_) => break,
        };
        if arg == 0 {
            break;
        }
        if used >= ARGS_CAP as u32 {
            event.args_truncated = 1;
            break;
        }
        // `used < ARGS_CAP` and the field has PATH_CAP bytes of slack, so a
        // full-size read at this offset stays inside it.
        let at = (used & (ARGS_CAP as u32 - 1)) as usize;
        let read = unsafe {
            bpf_probe_read_user_str(
                event.args.as_mut_ptr().add(at) as *mut c_void,
                PATH_CAP as u32,
                arg as *const c_void,
            )
        };
        if read <= 0 {
            break;
        }
        used += read as u32;
        event.argc += 1;
        i += 1;
    }
    if i == MAX_ARGS {
        // Only truncated if there really was another argument.
        let more: u64 =
            unsafe { bpf_probe_read_user((argv as *const u64).wrapping_add(i)) }.unwrap_or(0);
        if more != 0 {
            event.args_truncated = 1;
        }
    }
    event.args_len = used;
    entry.submit(0);
}

#[tracepoint(category = "syscalls", name = "sys_exit_execve")]
pub fn exec_exit(ctx: TracePointContext) -> u32 {
    let Some(binding) = current_binding() else {
        return 0;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let ret: i64 = unsafe { ctx.read_at(EXIT_RET) }.unwrap_or(-1);
    let event = ExecResultEvent {
        kind: EventKind::ExecResult as u8,
        _pad: [0; 3],
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        ret: ret as i32,
        policy_id: binding.policy_id,
    };
    if EVENTS.output::<ExecResultEvent>(&event, 0).is_err() {
        count_for(&binding, Counter::EventsLost);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent's context, so the parent's cgroup is the current one.
    let Some(binding) = current_binding() else {
        return 0;
    };
    let child_pid: i32 = unsafe { ctx.read_at(fork_child_pid_offset()) }.unwrap_or(0);
    let event = ForkEvent {
        kind: EventKind::Fork as u8,
        _pad: [0; 3],
        parent_pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        child_pid: child_pid as u32,
        policy_id: binding.policy_id,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if EVENTS.output::<ForkEvent>(&event, 0).is_err() {
        count_for(&binding, Counter::EventsLost);
    }
    0
}
