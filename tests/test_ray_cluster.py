"""`ray up` for real: Ray's local node provider on 127.0.0.1, over a private sshd.

The machine's own ssh set-up is left alone: the test starts ``sshd -f CONFIG`` on a free loopback
port with its own host key and authorized keys in a temporary folder, and the cluster config
reaches it through ``ssh_proxy_command: nc 127.0.0.1 PORT`` (Ray's config has no port field).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import free_port
from .test_encode import raw_shards

# Ray rewrites 127.0.0.1 to the IP of the route outwards (services.py, resolve_ip_for_localhost),
# for `ray start` and for drivers alike; this machine reaches nothing but loopback, and this
# variable makes Ray keep it. Token authentication (on by default since Ray 2.5x) is set
# explicitly: a driver joining an existing cluster sends the token only in token mode.
# A real cluster's nodes have routable IPs and need only the token mode.
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token"
CLUSTERS = os.path.join(os.path.dirname(__file__), os.pardir, "pipeline", "clusters")
VENV_BIN = os.path.dirname(sys.executable)


def test_shipped_cluster_configs_pass_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    for name in ("local.yaml", "aws.yaml"):
        with open(os.path.join(CLUSTERS, name)) as f:
            config = yaml.safe_load(f)
        validate_config(prepare_config(config))
    with open(os.path.join(CLUSTERS, "local.yaml")) as f:
        assert "available_node_types" not in yaml.safe_load(f)


@pytest.fixture()
def sshd(tmp_path):
    for tool in ("/usr/sbin/sshd", "ssh", "nc", "rsync", "ssh-keygen"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (make test installs openssh-server, rsync, netcat-openbsd)")
    folder = tmp_path / "ssh"
    folder.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
                      f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                      "StrictModes no\nUsePAM no\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while subprocess.run(["nc", "-z", "127.0.0.1", str(port)]).returncode != 0:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.1)
    yield {"port": port, "key": str(folder / "client_key")}
    proc.terminate()
    proc.wait()


@pytest.mark.slow
def test_ray_up_runs_the_encode_stage_and_ray_down(tmp_path, sshd):
    with open(os.path.join(CLUSTERS, "local.yaml")) as f:
        config = yaml.safe_load(f)
    gcs_port = free_port()
    ray = os.path.join(VENV_BIN, "ray")
    config.update(
        cluster_name=f"lverse-test-{gcs_port}", max_workers=0,
        provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        auth={"ssh_user": os.environ.get("USER", "root"), "ssh_private_key": sshd["key"],
              "ssh_proxy_command": f"nc 127.0.0.1 {sshd['port']}"},
        head_start_ray_commands=[f"{LOOPBACK} {ray} start --head --node-ip-address=127.0.0.1 --port={gcs_port} "
                                 "--num-cpus=2 --include-dashboard=false "
                                 "--autoscaling-config=~/ray_bootstrap_config.yaml"],
        worker_start_ray_commands=[])
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def ray_cli(*args, timeout=300):
        out = subprocess.run([ray, *args], capture_output=True, text=True, env=env, timeout=timeout)
        assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    raw = raw_shards(str(tmp_path / "raw"), count=2, n=4)
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS
    vae = str(tmp_path / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    tokens = tmp_path / "tokens"
    ray_cli("up", "-y", "--no-config-cache", str(cluster))
    try:
        ray_cli("exec", str(cluster), f"{LOOPBACK} {VENV_BIN}/lverse encode "
                f"--shards {raw} --vae {vae} --output {tokens} --executor ray --ray-address 127.0.0.1:{gcs_port}")
    finally:
        ray_cli("down", "-y", str(cluster))
        _kill_head_left_on(gcs_port)
    assert sorted(p.name for p in tokens.iterdir() if p.name.endswith(".tar")) == ["00000.tar", "00001.tar"]


def _kill_head_left_on(gcs_port: int) -> None:
    """`ray down` of the local provider leaves the head it started (gcs_server, raylet, monitor in
    one process group) running; end that group, found by this test's own GCS port, and nothing else."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        if words[0].endswith(b"gcs_server") and f"--gcs_server_port={gcs_port}".encode() in words:
            try:
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except ProcessLookupError:
                pass
