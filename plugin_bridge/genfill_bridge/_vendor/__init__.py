"""Third-party packages the bridge ships, unmodified except as noted in ``VENDORED.txt``.

Imported as ``genfill_bridge._vendor.websockets``, never as ``websockets``: an editor's Python
may already hold another websockets (Debian's python3-websockets is 10.4, without the sync
client), and the bridge must not replace or be replaced by it.
"""
