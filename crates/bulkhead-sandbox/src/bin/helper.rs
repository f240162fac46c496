//! Stand-alone entry point of the namespace sandbox's helper process.
fn main() {
    bulkhead_sandbox::namespace::helper_main()
}
