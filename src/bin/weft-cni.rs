//! `weft-cni`: weft's CNI chained plugin (spec 1.0.0 and 1.1.0). It runs after an interface
//! plugin (`ptp` with `host-local`, in the conflist the daemon writes): ADD sets the pod
//! interface's MTU and the host side's to the overlay MTU, registers the attachment with the
//! daemon and passes `prevResult` on; DEL forgets it (and succeeds when the daemon is down);
//! CHECK verifies the MTU and the registration; STATUS is code 50 while the daemon is not
//! ready; GC drops registrations not in `cni.dev/valid-attachments`; VERSION lists the versions.
//! Every failure is a CNI error object on stdout and a non-zero exit.

fn main() -> std::process::ExitCode {
    weft::cni::plugin::main()
}
