"""Peer authentication: each end of a link proves it holds the swarm's secret.

Mutual challenge-response, as in the peer handshake of :mod:`swarm.mesh.session`:
each end's hello carries a fresh random nonce, and each answers the other's hello with
``auth``: an HMAC-SHA256, keyed with the secret, over the swarm name, its own id, the
peer's id, the peer's nonce and its own nonce. So

* the secret never crosses the wire, and a listener learns nothing it can reuse;
* a recorded handshake replayed to a node fails: that node's nonce is new each time;
* a proof reflected back to its maker fails: the ids (prover first) are in the other
  order;
* a proof made for one pair of nodes or one swarm proves nothing for another.

Pure logic, no I/O: the session asks for nonces and proofs and checks them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import cbor2

#: Bytes of randomness in each hello's nonce.
NONCE_BYTES = 32
#: Bytes of an ``auth`` message's proof (SHA-256).
PROOF_BYTES = 32
#: Keeps these proofs apart from anything else the same secret might ever sign.
_LABEL = "swarmcache peer auth v1"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, swarm: str, prover: str, verifier: str,
          prover_nonce: bytes, verifier_nonce: bytes) -> bytes:
    """What ``prover`` sends ``verifier`` to show it holds ``secret``.

    The fields are CBOR-encoded as one array, so no two different handshakes give the
    same signed bytes (a concatenation could shift bytes between ids and nonces).
    """
    signed = cbor2.dumps([_LABEL, swarm, prover, verifier, verifier_nonce, prover_nonce])
    return hmac.new(secret, signed, hashlib.sha256).digest()


def verify(secret: bytes, swarm: str, prover: str, verifier: str,
           prover_nonce: bytes, verifier_nonce: bytes, given: bytes) -> bool:
    """Whether ``given`` is ``prover``'s proof to ``verifier``; constant time."""
    expected = proof(secret, swarm, prover, verifier, prover_nonce, verifier_nonce)
    return hmac.compare_digest(expected, given)
