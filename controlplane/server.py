"""A real kube-apiserver + etcd on loopback, for tests (the envtest pattern).

There is no controller-manager, scheduler or kubelet: objects are stored and
served, watches work, RBAC is enforced, but nothing reconciles.  In particular:

* pods are never scheduled or run: give them ``spec.nodeName`` and write their
  status yourself (see :mod:`controlplane.kubelet`);
* a gracefully deleted pod that has a ``nodeName`` keeps its
  ``deletionTimestamp`` until someone deletes it with grace period 0;
* deleted namespaces stay ``Terminating`` forever (no namespace controller);
* no ``default`` ServiceAccount is created per namespace, so the
  ``ServiceAccount`` admission plugin is disabled (otherwise every pod create
  would fail with "serviceaccount default not found").
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .binaries import ensure_binaries, find_binaries

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
DEFAULT_START_TIMEOUT = 90.0


class ControlPlaneError(RuntimeError):
    """The control plane failed to start (message carries the log tail)."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n_bytes: int = 6000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return data[-n_bytes:].decode("utf-8", "replace")


def _pdeathsig_preexec() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the child when the parent thread dies.

    Keeps a SIGKILLed pytest from leaking an apiserver/etcd.  Only used when
    the process is started from the main thread (the signal fires when the
    *thread* that forked exits).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _generate_rsa_key(path: Path) -> None:
    """Write a PEM RSA private key (for service-account token signing)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        openssl = shutil.which("openssl")
        if not openssl:
            raise ControlPlaneError(
                "need either the 'cryptography' package or the openssl CLI "
                "to generate the service-account signing key"
            )
        subprocess.run(
            [openssl, "genrsa", "-out", str(path), "2048"],
            check=True,
            capture_output=True,
        )
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class _Process:
    """One child process with its log file; stopped only via its own PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
        log.flush()
        preexec = (
            _pdeathsig_preexec
            if threading.current_thread() is threading.main_thread()
            else None
        )
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.cwd),
                preexec_fn=preexec,
                # Own process group: a Ctrl-C to pytest does not hit it
                # directly; stop() terminates it in order.
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)  # by PID (Popen), never by name
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.popen = None

    def tail(self) -> str:
        return _log_tail(self.log_path)


class ControlPlane:
    """kube-apiserver + etcd on 127.0.0.1 with RBAC on.

    Admin access is a static bearer token (user ``admin``, group
    ``system:masters``).  Typical use::

        cp = ControlPlane(); cp.start()
        api = kubernetes.client.CoreV1Api(cp.api_client())
        ...
        cp.stop()

    or as a context manager.
    """

    def __init__(
        self,
        binaries_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        extra_apiserver_args: list[str] | None = None,
        keep_tmpdir: bool | None = None,
    ):
        self._binaries_dir = Path(binaries_dir) if binaries_dir else None
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args or [])
        if keep_tmpdir is None:
            keep_tmpdir = os.environ.get("LLM_GATEWAY_KEEP_CONTROLPLANE", "") not in ("", "0")
        self.keep_tmpdir = keep_tmpdir

        self.tmpdir: Path | None = None
        self.etcd_client_port: int | None = None
        self.etcd_peer_port: int | None = None
        self.port: int | None = None  # apiserver secure port
        self.admin_token: str = "admin-" + uuid.uuid4().hex
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._atexit_registered = False
        self.startup_seconds: float | None = None  # last full start()
        self.apiserver_startup_seconds: float | None = None  # last apiserver start

    # ------------------------------------------------------------------ paths
    @property
    def binaries_dir(self) -> Path:
        if self._binaries_dir is None:
            self._binaries_dir = find_binaries() or ensure_binaries()
        return self._binaries_dir

    @property
    def host(self) -> str:
        """Base URL of the apiserver, e.g. ``https://127.0.0.1:34567``."""
        self._require_started()
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        self._require_started()
        return f"http://127.0.0.1:{self.etcd_client_port}"

    @property
    def cert_dir(self) -> Path:
        return self._tmp / "apiserver-certs"

    @property
    def ca_cert_path(self) -> Path:
        """PEM of the CA that signed the apiserver's self-signed serving cert."""
        return self._tmp / "ca.crt"

    @property
    def admin_kubeconfig_path(self) -> Path:
        return self._tmp / "admin.kubeconfig"

    @property
    def etcd_log_path(self) -> Path:
        return self._tmp / "etcd.log"

    @property
    def apiserver_log_path(self) -> Path:
        return self._tmp / "kube-apiserver.log"

    @property
    def _tmp(self) -> Path:
        if self.tmpdir is None:
            raise ControlPlaneError("control plane not started")
        return self.tmpdir

    def _require_started(self) -> None:
        if self.tmpdir is None or self.port is None:
            raise ControlPlaneError("control plane not started")

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "ControlPlane":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd, then kube-apiserver; return once /readyz is ok."""
        if self.tmpdir is not None:
            raise ControlPlaneError("already started")
        t0 = time.monotonic()
        bins = self.binaries_dir
        self.tmpdir = Path(tempfile.mkdtemp(prefix="llm-gateway-controlplane-"))
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._write_static_files()
            self.etcd_client_port = free_port()
            self.etcd_peer_port = free_port()
            while self.etcd_peer_port == self.etcd_client_port:
                self.etcd_peer_port = free_port()
            self._start_etcd(bins)
            self.port = free_port()
            self.start_apiserver()
            self._write_ca_and_kubeconfig()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Terminate apiserver then etcd (by PID), wait, remove the temp dir."""
        if self._apiserver is not None:
            self._apiserver.stop()
            self._apiserver = None
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        if self.tmpdir is not None:
            if self.keep_tmpdir:
                print(f"[controlplane] keeping {self.tmpdir}")
            else:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None
        self.port = None

    def stop_apiserver(self) -> None:
        """Stop only kube-apiserver (etcd keeps the data); port is kept for start_apiserver()."""
        self._require_started()
        if self._apiserver is not None:
            self._apiserver.stop()
            self._apiserver = None

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port against the same etcd."""
        if self.tmpdir is None or self.port is None or self._etcd is None:
            raise ControlPlaneError("control plane not started (etcd not running)")
        if self._apiserver is not None and self._apiserver.alive():
            raise ControlPlaneError("kube-apiserver already running")
        t0 = time.monotonic()
        proc = _Process(
            "kube-apiserver",
            self._apiserver_argv(self.binaries_dir),
            self.apiserver_log_path,
            self._tmp,
        )
        self._apiserver = proc
        deadline = time.monotonic() + self.start_timeout
        # The port was just released by a previous apiserver (restart): the
        # new one may fail to bind for a moment; wait until it is bindable.
        self._wait_port_free(self.port, deadline)
        proc.start()
        self._wait_ready(
            proc,
            f"https://127.0.0.1:{self.port}/readyz",
            deadline,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            ok=lambda status, body: status == 200 and body.strip() == b"ok",
        )
        self.apiserver_startup_seconds = time.monotonic() - t0

    def restart_apiserver(self) -> None:
        """stop_apiserver() + start_apiserver(): simulate an apiserver outage."""
        self.stop_apiserver()
        self.start_apiserver()

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.alive()

    # ---------------------------------------------------------------- clients
    def configuration(self, token: str | None = None) -> "Any":
        """A ``kubernetes.client.Configuration`` for *token* (default: admin)."""
        from kubernetes import client

        self._require_started()
        cfg = client.Configuration(host=self.host, ssl_ca_cert=str(self.ca_cert_path))
        cfg.api_key = {"authorization": token or self.admin_token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return cfg

    def api_client(self) -> "Any":
        """A ``kubernetes.client.ApiClient`` authenticated as admin (system:masters)."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    def client_for_token(self, token: str) -> "Any":
        from kubernetes import client

        return client.ApiClient(self.configuration(token))

    def ensure_service_account(self, namespace: str, name: str) -> None:
        """Create namespace (if missing) and ServiceAccount (if missing)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for create in (
                lambda: core.create_namespace(
                    client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
                ),
                lambda: core.create_namespaced_service_account(
                    namespace,
                    client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)),
                ),
            ):
                try:
                    create()
                except ApiException as exc:
                    if exc.status != 409:
                        raise

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        expiration_seconds: int = 3600,
        audiences: list[str] | None = None,
    ) -> str:
        """A bound token for ServiceAccount *namespace/name* (TokenRequest API).

        Creates the ServiceAccount (and namespace) if missing.  The apiserver
        enforces ``expiration_seconds >= 600``.
        """
        from kubernetes import client

        self.ensure_service_account(namespace, name)
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=list(audiences or []),
                expiration_seconds=expiration_seconds,
            )
        )
        with self.api_client() as api:
            resp = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, body
            )
        return resp.status.token

    def service_account_client(self, namespace: str, name: str, **kw: Any) -> "Any":
        """ApiClient authenticating as ServiceAccount *namespace/name*."""
        return self.client_for_token(self.service_account_token(namespace, name, **kw))

    def kubeconfig_for_token(
        self,
        token: str,
        path: str | os.PathLike[str] | None = None,
        *,
        user: str = "token-user",
        namespace: str | None = None,
    ) -> Path:
        """Write a kubeconfig using bearer *token*; returns its path.

        Default path: a fresh file in the control plane's temp dir.  The file
        is JSON, which is valid YAML for ``kubernetes.config.load_kube_config``.
        """
        self._require_started()
        if path is None:
            path = self._tmp / f"kubeconfig-{uuid.uuid4().hex[:8]}"
        path = Path(path)
        ca_data = base64.b64encode(self.ca_cert_path.read_bytes()).decode()
        context: dict[str, Any] = {"cluster": "envtest", "user": user}
        if namespace:
            context["namespace"] = namespace
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "envtest",
                    "cluster": {
                        "server": self.host,
                        "certificate-authority-data": ca_data,
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "envtest", "context": context}],
            "current-context": "envtest",
            "preferences": {},
        }
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)
        return path

    # -------------------------------------------------------------- internals
    def _write_static_files(self) -> None:
        tmp = self._tmp
        (tmp / "etcd-data").mkdir(mode=0o700)
        self.cert_dir.mkdir()
        _generate_rsa_key(tmp / "sa.key")
        # token,user,uid,"group1,group2"
        (tmp / "tokens.csv").write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n'
        )
        (tmp / "tokens.csv").chmod(0o600)

    def _start_etcd(self, bins: Path) -> None:
        client_url = f"http://127.0.0.1:{self.etcd_client_port}"
        peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
        argv = [
            str(bins / "etcd"),
            "--name=envtest",
            f"--data-dir={self._tmp / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=envtest={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",  # tests: durability across host crashes is irrelevant
            "--log-level=warn",
        ]
        self._etcd = _Process("etcd", argv, self.etcd_log_path, self._tmp)
        self._etcd.start()
        self._wait_ready(
            self._etcd,
            f"{client_url}/health",
            time.monotonic() + self.start_timeout,
            ok=lambda status, body: status == 200 and b'"health":"true"' in body,
        )

    def _apiserver_argv(self, bins: Path) -> list[str]:
        tmp = self._tmp
        return [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_client_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.cert_dir}",  # self-signs apiserver.crt (+ its CA)
            "--authorization-mode=RBAC",
            f"--token-auth-file={tmp / 'tokens.csv'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={tmp / 'sa.key'}",
            f"--service-account-signing-key-file={tmp / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # No controller-manager => no per-namespace "default" SA; with the
            # plugin on, every pod create would be refused.
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # The advertise address is loopback, which the "kubernetes"
            # Endpoints may not hold: don't try (and log errors) forever.
            "--endpoint-reconciler-type=none",
            # Quick, deterministic shutdown for restart_apiserver().
            "--shutdown-delay-duration=0s",
            *self.extra_apiserver_args,
        ]

    def _write_ca_and_kubeconfig(self) -> None:
        # --cert-dir writes apiserver.crt = serving cert followed by its CA.
        pem = (self.cert_dir / "apiserver.crt").read_text()
        blocks = [
            "-----BEGIN CERTIFICATE-----" + b
            for b in pem.split("-----BEGIN CERTIFICATE-----")[1:]
        ]
        if not blocks:
            raise ControlPlaneError(f"no certificate in {self.cert_dir / 'apiserver.crt'}")
        self.ca_cert_path.write_text(blocks[-1].strip() + "\n")
        self.kubeconfig_for_token(self.admin_token, self.admin_kubeconfig_path, user="admin")

    @staticmethod
    def _wait_port_free(port: int, deadline: float) -> None:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"port {port} still in use")
            time.sleep(0.1)

    def _wait_ready(
        self,
        proc: _Process,
        url: str,
        deadline: float,
        *,
        ok,
        headers: dict[str, str] | None = None,
    ) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # CA not known yet on first start
        last = "no answer yet"
        delay = 0.05
        while True:
            if not proc.alive():
                code = proc.popen.returncode if proc.popen else None
                tail = proc.tail()
                proc.stop()
                raise ControlPlaneError(
                    f"{proc.name} exited (code {code}) before becoming ready; "
                    f"log {proc.log_path}:\n{tail}"
                )
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    body = resp.read()
                    if ok(resp.status, body):
                        return
                    last = f"HTTP {resp.status}: {body[:300]!r}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:500]!r}"
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                tail = proc.tail()
                proc.stop()
                raise ControlPlaneError(
                    f"{proc.name} not ready at {url} within {self.start_timeout}s "
                    f"(last: {last}); log {proc.log_path}:\n{tail}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
