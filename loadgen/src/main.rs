//! Placeholder for the load generator (issue 3).
fn main() {
    eprintln!("loadgen: not built yet");
    std::process::exit(2);
}
