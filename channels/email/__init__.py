"""The email channel: talk to agents by email, approve by reply or by a signed link.

``settings`` reads IMAP/SMTP from the environment; ``mime`` reads and writes mail; ``inbound`` turns one received
mail into events (or a decision); ``watcher`` follows the mailbox over IMAP IDLE; ``delivery`` sends the ``email``
outbox over SMTP; ``links`` signs decision links and serves their confirm page.
"""
