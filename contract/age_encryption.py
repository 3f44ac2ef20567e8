"""age (filippo.io/age) encryption of exported weights, with pyrage (the Rust `rage` implementation's bindings).

`save_weights_external(..., age_encryption_recipients=[...])` asks for every exported file to be encrypted to those
recipients, as Tinker does: the API checks each recipient at the door (`parse_recipients`, a 400 naming the bad
one), and the worker encrypts the folder it wrote (`encrypt_folder`): `<file>` becomes `<file>.age` (binary age
format), decryptable with `age -d -i <identity>` or `rage`, by any one recipient's identity.

Limits: recipients are native X25519 keys (`age1...`) or SSH public keys (`ssh-ed25519 ...`, `ssh-rsa ...`);
plugin recipients (`age1<plugin>1...`) need a plugin binary on the worker and are refused. Loom keeps no plaintext
copy of an encrypted export: it cannot be sampled from, and a lost identity loses the files.
"""

from __future__ import annotations

from pathlib import Path

import pyrage
from pyrage import ssh, x25519

Recipient = x25519.Recipient | ssh.Recipient
AGE_SUFFIX = ".age"


class BadRecipient(ValueError):
    """A string that is neither an age X25519 recipient nor an SSH public key age accepts."""


def parse_recipient(text: str) -> Recipient:
    """The age recipient `text` names: `age1...` or an OpenSSH public key line."""
    text = text.strip()
    try:
        if text.startswith("age1"):
            return x25519.Recipient.from_str(text)
        if text.startswith("ssh-"):
            return ssh.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise BadRecipient(f"not a valid age recipient: {exc}") from exc
    raise BadRecipient("an age recipient is an X25519 key (`age1...`) or an SSH public key (`ssh-ed25519 ...`)")


def parse_recipients(texts: list[str]) -> list[Recipient]:
    """Every recipient of `texts`; `BadRecipient` (its message naming the index) for the first bad one."""
    recipients = []
    for index, text in enumerate(texts):
        try:
            recipients.append(parse_recipient(text))
        except BadRecipient as exc:
            raise BadRecipient(f"[{index}] {exc}") from exc
    return recipients


def encrypt_folder(folder: Path, recipients: list[str]) -> None:
    """Replace every file of `folder` by its age encryption to `recipients`, named `<file>.age`."""
    parsed = parse_recipients(recipients)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        pyrage.encrypt_file(str(path), str(path.with_name(path.name + AGE_SUFFIX)), parsed)
        path.unlink()
