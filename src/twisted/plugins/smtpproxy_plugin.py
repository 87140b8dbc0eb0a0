from twisted.application.service import ServiceMaker

smtpproxy = ServiceMaker(
    "smtpproxy",
    "smtpproxy.tap",
    "Relay SMTP mail to Microsoft Graph (or stdout)",
    "smtpproxy",
)
