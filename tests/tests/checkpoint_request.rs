//! `ftctl checkpoint SERVICE`: watchd asks a registered libft application to checkpoint, over
//! the application's own socket, and shows what it reports in `ftctl status`.

use std::time::Duration;

use ftkit_tests::{Watchd, binary, q};

#[test]
fn ftctl_checkpoint_reaches_the_application_and_status_shows_the_result() {
    let services = format!(
        "[[service]]\nname = \"app\"\ncommand = {}\nready = {{ notify = true }}\n\
         [[service]]\nname = \"plain\"\ncommand = {}\nargs = [\"1000\"]\n",
        q(binary("ckptreq")),
        q("/bin/sleep")
    );
    let w = Watchd::start("ckptreq", &services);
    w.wait_running("app");
    w.wait_for("app", "registered", Duration::from_secs(5), |s| {
        s["registered"] == true
    });

    let out = w.ftctl(&["checkpoint", "app", "--stream", "3"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let s = w.wait_for(
        "app",
        "a reported checkpoint",
        Duration::from_secs(5),
        |s| s["checkpoint"]["seq"] == 1,
    );
    assert_eq!(s["checkpoint"]["stream"], 3, "{s}");
    assert_eq!(s["checkpoint"]["bytes"], 4096, "{s}");
    assert_eq!(s["checkpoint"]["pause_us"], 250, "{s}");
    let table = w.ftctl_ok(&["status"]);
    assert!(table.contains("3:#1 4.0 KiB"), "{table}");

    // A service that never registered with libft cannot be asked: an error, exit 2.
    let out = w.ftctl(&["checkpoint", "plain"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no process registered with libft"),
        "{out:?}"
    );
    // An unknown service is a valid negative answer: exit 1.
    assert_eq!(w.ftctl(&["checkpoint", "nosuch"]).status.code(), Some(1));

    // After a restart of watchd the application re-registers on its own and can be asked again.
    let mut w = w;
    w.kill9();
    w.restart();
    w.wait_for("app", "re-registered", Duration::from_secs(10), |s| {
        s["registered"] == true
    });
    let out = w.ftctl(&["checkpoint", "app"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    w.wait_for("app", "second checkpoint", Duration::from_secs(5), |s| {
        s["checkpoint"]["seq"] == 2
    });
}
