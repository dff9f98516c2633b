"""Real mail servers for the email tests: an unprivileged Dovecot (IMAP + LMTP) and an aiosmtpd SMTP server that
relays every message over LMTP into it, so SMTP -> IMAP is the real path.

Dovecot comes from Debian's dovecot-imapd and dovecot-lmtpd. When it is missing the tests fail, saying how to
install it (CI installs it in .ci/run).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
DOMAIN = "example.org"
PASSWORD = "imap-test-password"
USERS = ("bot", "bob", "alice", "mallory")
INSTALL = ("Dovecot is needed for the email tests: apt-get install dovecot-imapd dovecot-lmtpd "
           "(see README, Tests)")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    root: Path
    imap_port: int
    lmtp_port: int
    config: Path
    proc: subprocess.Popen[bytes]

    def kick(self, user: str) -> None:
        """Drop the user's IMAP connections, as a server restart or a network cut would."""
        subprocess.run([DOVEADM, "-c", str(self.config), "kick", user], check=True, capture_output=True, timeout=10)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "dovecot.log").read_text()
        return ""


@contextlib.contextmanager
def dovecot(root: Path) -> Iterator[Dovecot]:
    if not os.path.exists(DOVECOT):
        raise RuntimeError(INSTALL)
    if os.geteuid() == 0:  # as root, mail and login processes run as an unprivileged account owning the directory
        account = pwd.getpwnam("nobody")
        user, group, uid, gid = account.pw_name, grp.getgrgid(account.pw_gid).gr_name, account.pw_uid, account.pw_gid
    else:
        uid, gid = os.getuid(), os.getgid()
        user, group = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name
    imap_port, lmtp_port = free_port(), free_port()
    for sub in ("run", "state", "home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [f"{u}@{DOMAIN}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{root}/home/{u}::" for u in USERS]
    (root / "passwd").write_text("\n".join(lines) + "\n")
    config = root / "dovecot.conf"
    config.write_text(f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
protocols = imap lmtp
listen = 127.0.0.1
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
auth_username_format = %Lu
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service anvil {{
  chroot =
}}
""")
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid)
    with open(root / "stdout.log", "wb") as out:
        proc = subprocess.Popen([DOVECOT, "-F", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    server = Dovecot(root, imap_port, lmtp_port, config, proc)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dovecot exited: {(root / 'stdout.log').read_text()}{server.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", imap_port), 0.2):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", lmtp_port), 0.2):
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"dovecot did not start listening: {server.log()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeDns:
    """A DNS server on a loopback UDP port that answers TXT queries from ``records``; while ``silent`` it answers
    nothing (what a DNS outage looks like to a resolver: a timeout)."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = {k.rstrip(".").lower(): v for k, v in records.items()}
        self.silent = False
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rdatatype

        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries += 1
            if self.silent:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            text = self.records.get(question.name.to_text().rstrip(".").lower())
            if text is not None and question.rdtype == dns.rdatatype.TXT:
                chunks = " ".join(f'"{text[i : i + 200]}"' for i in range(0, len(text), 200))
                reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "TXT", chunks))
            elif text is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@dataclass
class Relay:
    """The SMTP server: every message it accepts goes over LMTP into Dovecot, and is kept for the test to read."""

    lmtp_port: int
    received: list[tuple[list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        data = bytes(envelope.original_content or envelope.content)
        rcpts = list(envelope.rcpt_tos)
        await asyncio.to_thread(self._lmtp, envelope.mail_from, rcpts, data)
        self.received.append((rcpts, data))
        return "250 OK delivered"

    def _lmtp(self, sender: str, rcpts: list[str], data: bytes) -> None:
        with smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=10) as lmtp:
            lmtp.sendmail(sender, rcpts, data)

    def mails(self, to: str) -> list[EmailMessage]:
        out = []
        for rcpts, data in self.received:
            if to in rcpts:
                out.append(message_from_bytes(data, policy=policy.default))
        return out  # type: ignore[return-value]


@contextlib.contextmanager
def smtp_relay(lmtp_port: int) -> Iterator[tuple[Relay, int]]:
    relay = Relay(lmtp_port)
    port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield relay, port
    finally:
        controller.stop()
