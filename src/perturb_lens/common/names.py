"""Names from a config that become folders: one plain path component each, so that every path
built from them stays inside the folder the user named (``runs/NAME-HASH``, ``OUT/SAE_NAME``,
``OUT/LABEL``). ``../x``, ``/abs``, ``a/b``, ``.``, ``..`` and hidden names are refused."""

from __future__ import annotations

MAX_LENGTH = 100


def is_plain_name(name: str) -> bool:
    """One path component of at most :data:`MAX_LENGTH` characters: no ``/``, ``\\``, ``:`` or
    control characters, not empty, not starting with ``.`` (so not ``.`` or ``..``)."""
    return not (
        not name
        or name.startswith(".")
        or any(c in name for c in "/\\:")
        or any(ord(c) < 32 for c in name)
        or len(name) > MAX_LENGTH
    )


def check_folder_name(name: str, what: str, where: str) -> str:
    """``name`` if plain (:func:`is_plain_name`), else a ValueError: ``what`` names the setting
    (e.g. "SAE name"), ``where`` the folder it becomes (e.g. "--out/NAME")."""
    if not is_plain_name(name):
        raise ValueError(
            f"{what} {name!r} must be a plain folder name of at most {MAX_LENGTH} characters (no "
            "'/', '\\', ':' or control characters, not starting with '.'): it names the folder "
            f"{where}, which must stay inside the output folder."
        )
    return name
