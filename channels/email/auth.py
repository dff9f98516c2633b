"""Is a mail really from its From address? An aligned DKIM signature that verifies over the whole mail, or a
trusted MTA's ``Authentication-Results: dmarc=pass``, says yes. Runs in a worker thread (DNS and RSA block).

A DNS lookup that cannot be answered now (timeout, no server) is no verdict: ``TemporaryAuthFailure`` asks the
caller to try the mail again later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dns.resolver

DnsFunc = Callable[..., Any]  # dkimpy's TXT lookup: (name: bytes, timeout: int) -> bytes | None


class TemporaryAuthFailure(Exception):
    """The mail could not be checked now (DNS did not answer); try it again later."""


@dataclass(frozen=True)
class Auth:
    verified: bool  # the From domain vouches for this mail
    problem: str = ""  # why it looks forged ("" when nothing speaks against it, e.g. simply unsigned)
    how: str = ""  # what vouched ("dkim d=example.org", "dmarc=pass by mx.example.org")
    unchecked: str = ""  # why its signature could not be checked (no sign of forgery, but no authentication)

    def why_not(self, domain: str) -> str:
        """Why this mail does not count as authenticated, in words for its sender."""
        generic = (f"the mail is not authenticated: it has no DKIM signature of {domain} and no trusted server "
                   "reported DMARC pass for it")  # fmt: skip
        return self.problem or self.unchecked or generic


def aligned(from_domain: str, signer: str) -> bool:
    """DKIM alignment: the From domain is the signing domain or one of its subdomains."""
    return bool(signer) and (from_domain == signer or from_domain.endswith("." + signer))


def _headers(raw: bytes, name: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", head)
    prefix = name.lower() + b":"
    return [line[len(prefix):].decode(errors="replace").strip() for line in re.split(rb"\r?\n", unfolded)
            if line.lower().startswith(prefix)]  # fmt: skip


def dmarc_pass(results: list[str], trusted: frozenset[str], from_domain: str) -> str:
    """The trusted authserv-id that reported ``dmarc=pass`` for the From domain ("" if none). The trusted MTA
    removes any Authentication-Results carrying its own id from incoming mail (RFC 8601 section 5)."""
    for header in results:
        authserv, _, rest = header.partition(";")
        server = authserv.strip().split()[0].lower() if authserv.strip() else ""
        if server not in trusted:
            continue
        for clause in rest.split(";"):
            m = re.match(r"\s*dmarc\s*=\s*(\w+)", clause, re.I)
            if not m or m.group(1).lower() != "pass":
                continue
            said = re.search(r"header\.from\s*=\s*([^\s;]+)", clause, re.I)
            if said is None or said.group(1).lower().strip('"') == from_domain:
                return server
    return ""


def resolver(address: str = "", timeout: float = 5.0) -> DnsFunc:
    """A TXT lookup over dnspython: the system's resolver, or the one at ``address`` ("host" or "host:port")."""
    state: dict[str, dns.resolver.Resolver] = {}

    def lookup(name: bytes, **ignored: Any) -> bytes | None:  # dkimpy's own timeout gives way to ours
        res = state.get("r")
        if res is None:
            res = dns.resolver.Resolver(configure=not address)
            if address:
                host, _sep, port = address.rpartition(":") if address.count(":") == 1 else (address, "", "")
                res.nameservers, res.port = [host], int(port or 53)
            res.lifetime = timeout
            state["r"] = res
        try:
            answer = res.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        for record in answer:
            return b"".join(record.strings)
        return None

    return lookup


def authenticate(
    raw: bytes, sender: str, *, dns_lookup: DnsFunc, required_domains: frozenset[str] = frozenset(),
    trusted: frozenset[str] = frozenset(), complete: bool = True,
) -> Auth:  # fmt: skip
    """Check the whole mail ``raw`` from ``sender`` (``complete=False``: only its beginning was fetched, so no
    signature can verify); raises TemporaryAuthFailure when DNS cannot answer now."""
    domain = sender.rsplit("@", 1)[-1].lower()
    server = dmarc_pass(_headers(raw, b"authentication-results"), trusted, domain)
    if server:
        return Auth(True, how=f"dmarc=pass by {server}")
    signatures = len(_headers(raw, b"dkim-signature"))
    if not signatures:
        problem = f"{domain} signs its mail, but this one has no DKIM signature" if domain in required_domains else ""
        return Auth(False, problem)
    if not complete:
        return Auth(False, unchecked="the mail is too large to check its DKIM signature")
    failed: list[str] = []

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            return dns_lookup(name, timeout=timeout)  # type: ignore[no-any-return]
        except Exception as exc:  # dkimpy would read any DNS failure as "does not verify": keep it apart
            failed.append(f"{type(exc).__name__}: {exc}"[:200])
            raise TemporaryAuthFailure(f"DNS lookup of {name.decode(errors='replace')} failed") from None

    problem = "DKIM signature does not verify"
    for idx in range(signatures):  # one aligned signature that verifies is enough (lists add their own)
        checker = dkim.DKIM(raw)
        try:
            ok = checker.verify(idx=idx, dnsfunc=lookup)
        except TemporaryAuthFailure:
            raise
        except Exception as exc:  # dkimpy raises on malformed signatures and some failed checks
            if failed:
                raise TemporaryAuthFailure(f"DKIM key lookup failed ({failed[0]})") from None
            readable = isinstance(exc, dkim.ValidationError)
            problem = (
                "DKIM signature does not verify" if readable else f"DKIM signature unreadable ({type(exc).__name__})"
            )
            continue
        if failed:
            raise TemporaryAuthFailure(f"DKIM key lookup failed ({failed[0]})")
        signer = (checker.domain or b"").decode().lower()
        if ok and aligned(domain, signer):
            return Auth(True, how=f"dkim d={signer}")
        if ok:
            problem = f"DKIM signer {signer} does not align with From domain {domain}"
    return Auth(False, problem)
