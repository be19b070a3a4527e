"""Certificates and kubeconfigs of a local cluster: a fresh CA per cluster, nothing reused.

Part of the local cluster (fieldkube.localcluster.harness). Keys are ECDSA P-256 (fast to generate), except
the service-account signing key, which is RSA because the API server signs tokens with RS256.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass
class _KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _issue(
    subject: x509.Name,
    issuer: _KeyPair | None,
    *,
    ca: bool = False,
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
    client: bool = False,
) -> _KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = [x509.ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names or server_ips:
            usages.append(x509.ExtendedKeyUsageOID.SERVER_AUTH)
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    signer = issuer.key if issuer else key
    return _KeyPair(key=key, cert=builder.sign(signer, hashes.SHA256()))


def write_file(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_cluster_pki(
    pki_dir: Path,
    service_cluster_ip_range: str,
    mpi_operator_user: str,
    node_name: str = "fieldkube-node",
    node_ip: str = "10.213.0.1",
) -> None:
    """Write the CA, the API server's serving pair, each component's client pair, the front-proxy
    pair and the service-account signing key into ``pki_dir`` (keys 0600, certificates 0644).

    The real node's pairs are written too (cheap, and the API server's kubelet-client flags need
    them at start): the kubelet's client identity ``system:node:<node_name>`` (what the Node
    authorizer expects), its serving pair for ``node_ip``, and the clients of kube-proxy and CoreDNS.
    """

    def pki(name: str) -> Path:
        return pki_dir / name

    ca = _issue(_name("fieldkube-local-ca"), None, ca=True)
    write_file(pki("ca.crt"), ca.cert_pem, 0o644)
    write_file(pki("ca.key"), ca.key_pem)
    serving = _issue(
        _name("kube-apiserver"),
        ca,
        server_names=[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        # node_ip: pods reach the API server through a forwarder on the real node's bridge address.
        server_ips=["127.0.0.1", node_ip, str(next(ipaddress.ip_network(service_cluster_ip_range).hosts()))],
    )
    write_file(pki("apiserver.crt"), serving.cert_pem, 0o644)
    write_file(pki("apiserver.key"), serving.key_pem)
    clients = {
        "admin": ("kubernetes-admin", "system:masters"),
        "controller-manager": ("system:kube-controller-manager", None),
        "scheduler": ("system:kube-scheduler", None),
        "kwok": ("fieldkube:kwok-controller", "system:masters"),
        "mpi-operator": (mpi_operator_user, None),
        # The API server's identity towards kubelets (logs, exec, port-forward).
        "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
        "kubelet": (f"system:node:{node_name}", "system:nodes"),
        "kube-proxy": ("system:kube-proxy", None),  # bound to system:node-proxier by default RBAC
        "coredns": ("fieldkube:coredns", None),
    }
    for user, (cn, org) in clients.items():
        pair = _issue(_name(cn, org), ca, client=True)
        write_file(pki(f"{user}.crt"), pair.cert_pem, 0o644)
        write_file(pki(f"{user}.key"), pair.key_pem)
    kubelet_serving = _issue(_name(f"system:node:{node_name}", "system:nodes"), ca, server_ips=[node_ip])
    write_file(pki("kubelet-serving.crt"), kubelet_serving.cert_pem, 0o644)
    write_file(pki("kubelet-serving.key"), kubelet_serving.key_pem)
    # The front-proxy pair (as kubeadm sets up): the API server authenticates to aggregated API
    # servers with it, and controller-manager and scheduler read its CA to trust proxied requests.
    front_proxy_ca = _issue(_name("fieldkube-local-front-proxy-ca"), None, ca=True)
    write_file(pki("front-proxy-ca.crt"), front_proxy_ca.cert_pem, 0o644)
    front_proxy = _issue(_name("front-proxy-client"), front_proxy_ca, client=True)
    write_file(pki("front-proxy-client.crt"), front_proxy.cert_pem, 0o644)
    write_file(pki("front-proxy-client.key"), front_proxy.key_pem)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_file(
        pki("sa.key"),
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    write_file(
        pki("sa.pub"),
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )


def kubeconfig_text(server: str, ca_pem: bytes, user: str, credentials: Mapping[str, str]) -> str:
    """A kubeconfig for ``server`` (trusting ``ca_pem``) with one user and its credentials."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fieldkube-local",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": dict(credentials)}],
        "contexts": [{"name": user, "context": {"cluster": "fieldkube-local", "user": user}}],
        "current-context": user,
    }
    return yaml.safe_dump(config, sort_keys=False)
