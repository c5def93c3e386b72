"""What the Python benchmarks share: a fresh `granary local`, dropping the page cache, the
machine's description and writing a table into docs/BENCHMARKS.md between markers."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def drop_page_cache() -> bool:
    """Drops the page cache (root only); whether it was dropped."""
    if os.geteuid() != 0:
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def granary_binary() -> str:
    built = ROOT / "target/release/granary"
    if built.exists():
        return str(built)
    found = shutil.which("granary")
    if not found:
        sys.exit("no granary binary: cargo build --release, or put granary on PATH")
    return found


class GranaryLocal:
    """`granary local` over `ufs` (a directory or s3://…), with a fresh state directory
    (cold caches)."""

    def __init__(self, ufs: str, work: Path, mount_config: str = "", binary: str = "",
                 env: dict = None):
        self.mnt = work / "mnt"
        self.state = work / "state"
        config = work / "mount.toml"
        config.write_text(mount_config)
        subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.state, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log = open(work / "granary-local.log", "w")
        self.proc = subprocess.Popen(
            [binary or granary_binary(), "local", "--ufs", ufs, "--mount", str(self.mnt),
             "--state-dir", str(self.state), "--master-listen", "127.0.0.1:0",
             "--config", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                sys.exit(f"granary local did not mount; see {self.log.name}")
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)
        self.log.close()


def machine(extra: str = "") -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu}){extra}, Linux {os.uname().release}"


def write_docs(path: Path, section: str, body: str):
    """Puts `body` between the `<!-- bench-SECTION:begin/end -->` markers of `path`."""
    begin, end = f"<!-- bench-{section}:begin -->", f"<!-- bench-{section}:end -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)
    print(f"wrote {path}", file=sys.stderr)
