"""twistd plugin: ``twistd mailguard``.

Plugin scanning imports this file, so it must stay one line that names the
module: the application is imported only when the plugin is used.
"""

from twisted.application.service import ServiceMaker

Mailguard = ServiceMaker(
    "mailguard",
    "mailguard.tap",
    "SMTP server that keeps spam out at the door",
    "mailguard",
)
