//! Critical memory as a C program sees it: compiled with `cc -Wall -Wextra -Werror -std=c11`
//! against the checked-in `include/ft.h` and linked to the `libft.so` that `cargo test -p ft`
//! built. A first run builds a linked list and a tree in t_ftmalloc'd memory with a registered
//! global root, checkpoints and dies of SIGKILL; a second run recovers and checks them.

mod critical_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use critical_support::{describe, heap_addr, killed_by_sigkill, unique};

const PROGRAM: &str = r#"
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ft.h"

struct node { long value; struct node *next; char *name; };
struct tree { long key; struct tree *left, *right; };

/* Registered with ft_critical: restored by t_recover. */
static struct { struct node *list; struct tree *tree; long count; } roots;

static struct tree *insert(struct tree *t, long key) {
    if (t == NULL) {
        t = t_ftmalloc(sizeof *t);
        if (t == NULL) { perror("t_ftmalloc"); exit(3); }
        t->key = key; t->left = t->right = NULL;
        return t;
    }
    if (key < t->key) t->left = insert(t->left, key); else t->right = insert(t->right, key);
    return t;
}

static long tree_sum(const struct tree *t, long *n, long lo, long hi) {
    if (t == NULL) return 0;
    if (t->key < lo || t->key > hi) { printf("tree order broken at %ld\n", t->key); exit(4); }
    (*n)++;
    return t->key + tree_sum(t->left, n, lo, t->key) + tree_sum(t->right, n, t->key, hi);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    printf("critical=%d\n", ft_critical(&roots, sizeof roots));
    printf("critical_null=%d\n", ft_critical(NULL, 8));
    if (strcmp(mode, "build") == 0) {
        printf("recover_empty=%lld\n", (long long)t_recover(0));
        for (long i = 0; i < 500; i++) {
            struct node *n = t_ftmalloc(sizeof *n);
            char *name = t_ftmalloc(32);
            if (n == NULL || name == NULL) { perror("t_ftmalloc"); return 3; }
            snprintf(name, 32, "node-%ld", i);
            n->value = i * 7; n->next = roots.list; n->name = name;
            roots.list = n;
            roots.count++;
        }
        long keys[] = {50, 20, 80, 10, 30, 70, 90, 25, 75, 5};
        for (unsigned i = 0; i < sizeof keys / sizeof keys[0]; i++) roots.tree = insert(roots.tree, keys[i]);
        void *scratch = t_ftmalloc(1000);
        t_ftfree(scratch);
        t_ftfree(NULL);
        errno = 0;
        void *huge = t_ftmalloc((size_t)1 << 40);
        printf("huge_null=%d errno_enomem=%d\n", huge == NULL, errno == ENOMEM);
        printf("sync=%d\n", t_checkpoint_sync(0));
        /* Not checkpointed: must be gone after the crash. */
        roots.count = -1;
        roots.list->value = -1;
        printf("async=%d\n", t_checkpoint(7));
        printf("wait=%d\n", t_checkpoint_wait(7));
        fflush(stdout);
        raise(SIGKILL);
        return 1;
    }
    /* mode "verify" */
    long long seq = t_recover(0);
    printf("recover=%lld\n", seq);
    printf("report=%s\n", t_recover_report());
    long n = 0, expect = 499;
    for (struct node *p = roots.list; p != NULL; p = p->next, expect--, n++) {
        char want[32];
        snprintf(want, sizeof want, "node-%ld", expect);
        if (p->value != expect * 7 || strcmp(p->name, want) != 0) {
            printf("bad node %ld: value %ld name %s\n", expect, p->value, p->name);
            return 5;
        }
    }
    long tn = 0;
    long sum = tree_sum(roots.tree, &tn, -1000, 1000);
    printf("count=%ld nodes=%ld tree_nodes=%ld tree_sum=%ld\n", roots.count, n, tn, sum);
    /* The allocator goes on after recovery; new blocks are new memory. */
    struct node *fresh = t_ftmalloc(sizeof *fresh);
    int overlap = 0;
    for (struct node *p = roots.list; p != NULL; p = p->next)
        if ((char *)fresh < (char *)p + sizeof *p && (char *)p < (char *)fresh + sizeof *fresh) overlap = 1;
    printf("fresh_overlap=%d\n", overlap);
    printf("every=%d safe=%d every_off=%d\n", t_checkpoint_every(0, 1000), t_safe_point(),
           t_checkpoint_every(0, 0));
    printf("strerror=%s\n", ft_strerror(FT_ENOSPC));
    return 0;
}
"#;

fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .expect("test binary is in <target>/<profile>/deps")
        .to_owned()
}

/// Compiles PROGRAM against libft.so; None (with a message) when there is no C compiler.
fn build(dir: &Path) -> Option<PathBuf> {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no C compiler `cc` on PATH, the C ABI test cannot run");
        return None;
    }
    let lib_dir = artifact_dir();
    let lib = lib_dir.join("libft.so");
    assert!(
        lib.exists(),
        "{} missing: `cargo test -p ft` builds it",
        lib.display()
    );
    let source = dir.join("critical.c");
    std::fs::write(&source, PROGRAM).expect("write C source");
    let exe = dir.join("critical");
    let out = Command::new("cc")
        .args([
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-I",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&source)
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

fn run(exe: &Path, mode: &str, env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(exe);
    cmd.arg(mode);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the C program")
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.split_whitespace()
        .chain(out.lines())
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn c_program_checkpoints_and_recovers_pointers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(exe) = build(dir.path()) else {
        return;
    };
    let env = vec![
        ("FT_SERVICE", unique("crit-capi")),
        ("FT_HEAP_ADDR", format!("{:#x}", heap_addr(70))),
        ("FT_HEAP_SIZE", "64MiB".to_owned()),
        ("FT_CKPT_DIR", dir.path().join("ckpt").display().to_string()),
    ];
    let first = run(&exe, "build", &env);
    assert!(killed_by_sigkill(&first), "{}", describe(&first));
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    for (key, want) in [
        ("critical", "0"),
        ("critical_null", "-5"),
        ("recover_empty", "0"),
        ("huge_null", "1"),
        ("errno_enomem", "1"),
        ("sync", "0"),
        ("async", "0"),
        ("wait", "0"),
    ] {
        assert_eq!(field(&out, key), Some(want), "{key} in\n{out}");
    }
    assert!(dir.path().join("ckpt/0").is_dir() && dir.path().join("ckpt/7").is_dir());

    let second = run(&exe, "verify", &env);
    assert!(second.status.success(), "{}", describe(&second));
    let out = String::from_utf8_lossy(&second.stdout).into_owned();
    for (key, want) in [
        ("critical", "0"),
        ("recover", "1"),
        ("count", "500"),
        ("nodes", "500"),
        ("tree_nodes", "10"),
        ("tree_sum", "455"),
        ("fresh_overlap", "0"),
        ("every", "0"),
        ("safe", "0"),
        ("every_off", "0"),
    ] {
        assert_eq!(field(&out, key), Some(want), "{key} in\n{out}");
    }
    assert!(
        out.contains("report=stream 0: recovered checkpoint 1 from"),
        "{out}"
    );
    assert!(
        out.contains("strerror=no space left for the checkpoint"),
        "{out}"
    );
}
