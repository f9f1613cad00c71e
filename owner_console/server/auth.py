"""Who may connect, and who a key is now: the ZAP allow-list and key revocation.

A ZAP handler (:class:`AllowListAuthenticator`) admits only the public keys
registered in the workspace and gives each connection its key as
``User-Id``.  Every message's key is checked again against the allow-list
(:class:`owner_console.workspace.AllowList`, one ``stat`` when nothing
changed) through :class:`Keys`: a key that ``bastion-owner scientist
remove`` or a rotation took off the list is refused on its next message, on
a connection that is already open too, and a reply computed for it while it
was being revoked is withheld (:mod:`.dispatch`).
"""
from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..workspace import AllowList, Workspace

log = logging.getLogger("bastion.executor")

ZAP_DOMAIN = "bastion"


class AllowListAuthenticator(ThreadAuthenticator):
    """ZAP handler: a CURVE key is admitted iff the workspace allow-list has it.

    The allow-list (``scientists/*.toml``, through :class:`AllowList`) is
    checked at every handshake, so ``bastion-owner scientist add`` takes
    effect without a restart.  The connection's ``User-Id`` is the Z85 public
    key, which the executor looks up again on every message.
    """

    def __init__(self, context: zmq.Context, workspace: Workspace, allow_list: AllowList | None = None):
        super().__init__(context, log=logging.getLogger("bastion.zap"))
        self.workspace = workspace
        self.allow_list = allow_list or AllowList(workspace)
        self._names: dict[bytes, str] = {}
        self._refused: set[bytes] = set()

    def admitted_name(self, key: str) -> str | None:
        """The name a key had when it was last admitted (for the audit of a revoked key's messages)."""
        return self._names.get(key.encode("ascii", "replace"))

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials-provider hook: is this Z85 public key allowed?"""
        try:
            name = self.allow_list.name_of(bytes(key))
        except Exception:  # a broken workspace admits no one, and must not kill the ZAP thread
            log.exception("cannot read the scientist allow-list; refusing %s", bytes(key)[:8])
            return False
        if name is None:
            # A refused client keeps reconnecting: say it once per key, not every 100 ms.
            if bytes(key) not in self._refused and len(self._refused) < 10_000:
                self._refused.add(bytes(key))
                log.warning("refused an unknown CURVE key %s", bytes(key).decode("ascii", "replace"))
            return False
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[bytes(key)] = name
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        return z85.encode(client_public_key).decode("ascii")



class Keys:
    """The allow-list as the executor consults it: at each handshake and again on every message.

    Parameters
    ----------
    workspace : Workspace
        The workspace whose ``scientists/*.toml`` list the allowed keys.
    """

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.allow_list = AllowList(workspace)
        self.authenticator: AllowListAuthenticator | None = None

    def start(self, context: zmq.Context) -> None:
        """Start the ZAP handler for :data:`ZAP_DOMAIN` on ``context``."""
        self.authenticator = AllowListAuthenticator(context, self.workspace, self.allow_list)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.authenticator)

    def stop(self) -> None:
        """Stop the ZAP handler (if started)."""
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def name_of(self, key: str) -> str | None:
        """The scientist the allow-list names for this key now; None if none, or if it cannot be read
        (a broken allow-list admits no one, and must not stop the loop)."""
        try:
            return self.allow_list.name_of(key)
        except Exception:
            log.exception("cannot read the scientist allow-list; refusing %s", key[:8])
            return None

    def name_for_audit(self, key: str) -> str | None:
        """The scientist a key belongs to, or belonged to when it was admitted (a revoked key)."""
        name = self.name_of(key)
        if name is None and self.authenticator is not None:
            name = self.authenticator.admitted_name(key)
        return name
