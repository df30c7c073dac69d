"""Credentials for a Flower deployment with TLS and SuperNode authentication (docs/flower.md, Deployment).

    python make_credentials.py DIR --host superlink.example.org [--host 10.0.0.5 ...]   # on the SuperLink
    python make_credentials.py DIR --node node0                                        # on each client

``--host`` (repeatable; DNS names or IP addresses, each a subjectAltName): a fresh CA (``DIR/ca.crt``, to
give to every SuperNode and every ``flwr`` user) and the SuperLink's certificate ``DIR/server.pem`` with
its key ``DIR/server.key``. The CA's private key is not kept: to reissue, make a new CA. ``--node NAME``
(repeatable): a SuperNode key pair, ``DIR/NAME`` (OpenSSH private key, for ``flower-supernode
--auth-supernode-private-key``; it stays on the client) and ``DIR/NAME.pub`` (OpenSSH public key, for
``flwr supernode register``), as ``ssh-keygen -t ecdsa -b 384 -N "" -f DIR/NAME`` makes them. All keys
are ECDSA P-384; private keys are written readable by their owner only. Existing files are not
overwritten. An organisation's own PKI can replace the ``--host`` part.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls(out: Path, hosts: list[str], days: int = DAYS) -> None:
    """``ca.crt``, ``server.pem`` and ``server.key`` in ``out`` for a SuperLink reached as ``hosts``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca = (x509.CertificateBuilder().subject_name(_name("fedmoe deployment CA"))
          .issuer_name(_name("fedmoe deployment CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         **usage), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    _write(out / "server.key", key.private_bytes(pem, pkcs8, serialization.NoEncryption()), private=True)


def make_node_key(out: Path, name: str) -> None:
    """``out/name`` (OpenSSH private key) and ``out/name.pub`` (OpenSSH public key): a SuperNode's key."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()), private=True)
    _write(out / f"{name}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH) + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--host", action="append", default=[],
                        help="a name or address SuperNodes and flwr use for the SuperLink (repeatable)")
    parser.add_argument("--node", action="append", default=[],
                        help="a SuperNode key pair to make (repeatable)")
    parser.add_argument("--days", type=int, default=DAYS, help="certificate validity (days)")
    args = parser.parse_args(argv)
    if not args.host and not args.node:
        parser.error("nothing to make: give --host and/or --node")
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.host:
        make_tls(args.dir, args.host, args.days)
    for name in args.node:
        make_node_key(args.dir, name)


if __name__ == "__main__":
    main()
