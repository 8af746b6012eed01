//! Test helper: a libft program that answers watchd's "checkpoint now" requests by reporting a
//! checkpoint (numbered 1, 2, ...) back to watchd, and heartbeats meanwhile. It checks the
//! request channel between watchd and an application, not the checkpoint store.

use std::time::Duration;

fn main() {
    let watch = match ft::Watch::register() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ckptreq: cannot register with watchd: {e}");
            std::process::exit(1);
        }
    };
    let _ = watch.ready();
    let mut seq = 0u64;
    loop {
        let _ = watch.heartbeat(1, Duration::from_millis(2000));
        match watch.poll_command() {
            Ok(Some(ft::proto::WatchdMessage::CheckpointNow { stream })) => {
                seq += 1;
                println!("ckptreq: checkpoint of stream {stream} requested; reporting #{seq}");
                let _ = watch.checkpointed(stream, seq, 4096 * seq, Duration::from_micros(250));
            }
            Ok(Some(ft::proto::WatchdMessage::Promote { epoch })) => {
                println!("ckptreq: promoted (epoch {epoch})");
            }
            Ok(None) => {}
            Err(e) => eprintln!("ckptreq: poll failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
