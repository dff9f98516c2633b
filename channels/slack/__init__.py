"""The Slack channel: talk to agents in DMs, mentions and threads; approve with buttons and modals.

``app`` turns Slack's requests into inbound events (HTTP at POST /slack/events, or Socket Mode); ``delivery``
sends the ``slack`` outbox through the Web API; ``cards`` is the Block Kit. Settings come from SLACK_BOT_TOKEN,
SLACK_SIGNING_SECRET, SLACK_APP_TOKEN (Socket Mode) and SLACK_API_URL.
"""
