//! memhog: a test service that leaks memory: every `--every-ms` (default 1000) it allocates and
//! touches `--mb` MiB (default 10) more, up to `--max-mb` (default 512), so that its resident
//! size grows like a leaking server's.

use std::time::Duration;

use ftkit_tests::{arg_u64, helper_args, say};

const NAME: &str = "memhog";
const MIB: usize = 1 << 20;
/// Touch one byte per page so that the memory is resident, not just reserved.
const PAGE: usize = 4096;

fn main() {
    let args = helper_args(&["mb", "every-ms", "max-mb"]);
    let mb = usize::try_from(arg_u64(&args, "mb", 10)).expect("--mb fits in usize");
    let every = Duration::from_millis(arg_u64(&args, "every-ms", 1000));
    let max_mb = usize::try_from(arg_u64(&args, "max-mb", 512)).expect("--max-mb fits in usize");
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    let mut total = 0;
    loop {
        if total + mb <= max_mb {
            let mut chunk = vec![0u8; mb * MIB];
            for i in (0..chunk.len()).step_by(PAGE) {
                chunk[i] = 1;
            }
            hoard.push(chunk);
            total += mb;
            say(NAME, &format!("holding {total} MiB"));
        }
        std::thread::sleep(every);
    }
}
