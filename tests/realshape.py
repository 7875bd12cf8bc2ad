"""Kerio files in the real shape, generated: for tests and ``bench/``.

A real ``mailserver.cfg`` groups its settings in sections (``<table>``
elements holding ``<variable>`` elements directly) -- hundreds of names
mailguard does not use, around the few it does -- and keeps its records in
``<list>``/``<listitem>`` form; a real ``users.cfg`` holds ``D3S:``
passwords and columns mailguard ignores (``Rights``, ``PasswordHistory``
with ``SHA:`` values...).  The section and variable names below are Kerio's
where they are publicly documented (Administration/BuiltInAdminEnabled,
Directories/StoreDir, LogGlobal/RelativePathsRoot, Backup/Enabled, ...) and
Kerio-like elsewhere.
"""

from __future__ import annotations

import random
from pathlib import Path
from xml.sax.saxutils import escape

from mailguard.policy.passwords import make_d3s_password, make_sha_password

# Sections of a real mailserver.cfg and some of their variables.  None of
# these names is a mailguard name or one edit away from one.
KERIO_SECTIONS: dict[str, tuple[str, ...]] = {
    "Administration": ("BuiltInAdminEnabled", "BuiltInAdminUsername", "BuiltInAdminPassword",
                       "AdminPort", "AdminSecurePort", "AdminAllowedGroup", "RemoteAdminEnabled"),
    "Directories": ("StoreDir", "ArchiveDir", "BackupDir", "TempDir", "QueueDir", "SpoolDir"),
    "LogGlobal": ("RelativePathsRoot", "LogRotation", "LogMaxSize", "LogDebug", "LogSyslog",
                  "SyslogHost", "SyslogFacility"),
    "Backup": ("Enabled", "Schedule", "TargetDir", "KeepCount", "FullBackupDay", "Notify"),
    "FullTextSearch": ("Enabled", "Path", "IndexingThreads", "Language"),
    "InstantMessaging": ("Enabled", "StorePath", "Port", "SecurePort", "FederationEnabled"),
    "SmtpServer": ("SmtpServerPort", "SmtpServerSecurePort", "SmtpSubmissionPort",
                   "SmtpRelayEnabled", "SmtpRelayHost", "SmtpRelayPort", "SmtpRelayAuthRequired",
                   "SmtpRelayUsername", "SmtpRelayPassword", "SmtpBindAddress",
                   "SmtpMaxRecipientsPerHour", "SmtpMaxMessagesPerHour", "SmtpRequireTls",
                   "SmtpBannerText", "SmtpReverseDnsCheck", "SmtpSpfEnabled", "SmtpDkimEnabled"),
    "Pop3Server": ("Pop3Port", "Pop3SecurePort", "Pop3Enabled", "Pop3LoginDelay"),
    "ImapServer": ("ImapPort", "ImapSecurePort", "ImapEnabled", "ImapIdleEnabled",
                   "ImapMaxConnections"),
    "HttpServer": ("HttpPort", "HttpsPort", "HttpEnabled", "WebmailEnabled", "WebmailTheme",
                   "SessionTimeout", "CompressResponses"),
    "LdapServer": ("LdapPort", "LdapSecurePort", "LdapEnabled"),
    "Antivirus": ("AntivirusEnabled", "AntivirusEngine", "AntivirusUpdateInterval",
                  "AntivirusAction", "ScanArchives", "MaxArchiveDepth"),
    "SpamFilter": ("SpamFilterEnabled", "SpamScoreThreshold", "SpamTagScore", "SpamSubjectTag",
                   "BayesEnabled", "SpamAssassinEnabled", "BlacklistsEnabled", "CallerIdEnabled",
                   "SpfCheckEnabled", "RepellentEnabled"),
    "Archive": ("ArchiveEnabled", "ArchiveLocal", "ArchiveRemoteAddress", "ArchiveInterval",
                "ArchiveOutgoing", "ArchiveIncoming", "ArchiveInternal"),
    "Quarantine": ("QuarantineEnabled", "QuarantineAddress", "QuarantineDays"),
    "Scheduler": ("SchedulerEnabled", "SchedulerInterval", "EtrnHosts"),
    "Security": ("LoginBlockEnabled", "LoginBlockAttempts", "LoginBlockMinutes",
                 "PasswordPolicyEnabled", "PasswordMinLength", "TwoStepEnabled"),
    "Statistics": ("StatisticsEnabled", "StatisticsInterval", "StatisticsReportAddress"),
    "DnsResolver": ("DnsServers", "DnsCacheEnabled", "DnsTimeout", "HostsFileEnabled"),
    "Certificates": ("DefaultCertificate", "CertificateDir", "LetsEncryptEnabled"),
}


def kerio_names() -> list[str]:
    """Every (section, variable) name of L{KERIO_SECTIONS}, flattened, plus
    the numbered ones the generator writes: hundreds of real-looking
    names, none of them a mailguard name."""
    names = [n for vars_ in KERIO_SECTIONS.values() for n in vars_]
    return names + [f"{v}{i}" for i in range(1, 9) for v in ("CustomRule", "Forwarding", "Signature")]


def _var(name: str, value: str) -> str:
    return f'<variable name="{name}">{escape(value)}</variable>'


def mailserver_cfg(path: Path, *, settings: dict[str, tuple[str | None, str]] | None = None,
                   domains: int = 50, ip_rows: int = 2000, relay_group: str = "Trusted",
                   sections: bool = True, seed: int = 1) -> Path:
    """Write a mailserver.cfg in the real shape.

    @param settings: mailguard names to set: C{name -> (section, value)};
        section None puts the variable at the top level.
    @param domains: the Domain list: C{d0.example} ... (C{d0} has an
        alias C{a0.example}).
    @param ip_rows: rows of the IP group "Big" (single addresses and
        prefixes spread over public IPv4 -- none wider than a /24); the
        group C{relay_group} holds 127.0.0.2.
    """
    rnd = random.Random(seed)
    settings = settings or {}
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<config>"]
    for name, (section, value) in settings.items():
        if section is None:
            out.append(f"  {_var(name, value)}")
    for section, names in KERIO_SECTIONS.items() if sections else ():
        out.append(f'  <table name="{section}">')
        for n in names:
            out.append(f"    {_var(n, rnd.choice(['0', '1', '25', 'C:/Kerio/store', '']))}")
        for name, (where, value) in settings.items():
            if where == section:
                out.append(f"    {_var(name, value)}")
        out.append("  </table>")
    for name, (section, value) in settings.items():
        if section is not None and section not in KERIO_SECTIONS:
            out.append(f'  <table name="{section}">\n    {_var(name, value)}\n  </table>')
    # A record table Kerio has that mailguard does not read.
    out.append('  <list name="Rule">')
    for i in range(20):
        out.append(f"    <listitem>{_var('Name', f'rule {i}')}{_var('Condition', 'x')}"
                   f"{_var('Enabled', '1')}</listitem>")
    out.append("  </list>")
    out.append('  <list name="Domain">')
    for i in range(domains):
        aliases = "a0.example" if i == 0 else ""
        out.append(f"    <listitem>\n      {_var('Domain', f'd{i}.example')}\n"
                   f"      {_var('Aliases', aliases)}\n      {_var('Description', f'domain {i}')}\n"
                   f"      {_var('ForwardingHost', '')}\n    </listitem>")
    out.append("  </list>")
    out.append('  <list name="IpAddressGroup">')
    out.append(f"    <listitem>\n      {_var('Group', relay_group)}\n      {_var('Address', '127.0.0.2')}\n"
               f"      {_var('Enabled', '1')}\n      {_var('Description', 'the gateway')}\n    </listitem>")
    for i in range(ip_rows):
        a, b, c = rnd.randrange(1, 100), rnd.randrange(256), rnd.randrange(256)
        addr = f"{a}.{b}.{c}.{rnd.randrange(256)}" if i % 4 else f"{a}.{b}.{c}.0/24"
        out.append(f"    <listitem>\n      {_var('Group', 'Big')}\n      {_var('Address', addr)}\n"
                   f"      {_var('Enabled', '1')}\n      {_var('Description', f'row {i}')}\n    </listitem>")
    out.append("  </list>")
    out.append("</config>\n")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


#: Every generated user's password is "pw-" + its name.
def password_of(name: str) -> str:
    return f"pw-{name}"


def users_cfg(path: Path, *, users: int = 20000, domains: int = 50, nul_every: int = 0) -> Path:
    """Write a users.cfg in the real shape: C{users} users spread over the
    domains of L{mailserver_cfg}, each with a C{D3S:} password (L{password_of}),
    C{Rights}, a C{PasswordHistory} of C{SHA:} values and other columns.
    Every C{nul_every}-th user has C{NUL:} (no password)."""
    salt = b"5f678b6682"  # fixed: the file is the same on every run
    history = make_sha_password("an old password", b"\x00" * 8)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<config>", '  <list name="User">']
    for i in range(users):
        name = f"user{i}"
        if nul_every and i % nul_every == 0:
            password = "NUL:"
        else:
            password = make_d3s_password(password_of(name), salt)
        out.append("    <listitem>")
        out.append(f"      {_var('Name', name)}")
        out.append(f"      {_var('Domain', f'd{i % domains}.example')}")
        out.append(f"      {_var('FullName', f'User Number {i}')}")
        out.append(f"      {_var('Description', '')}")
        out.append(f"      {_var('Password', password)}")
        out.append(f"      {_var('PasswordHistory', history)}")
        out.append(f"      {_var('Rights', 'user')}")
        out.append(f"      {_var('Enabled', '1')}")
        out.append(f"      {_var('QuotaStorage', '0')}")
        out.append(f"      {_var('Aliases', f'u{i}' if i % 10 == 0 else '')}")
        out.append("    </listitem>")
    out.append("  </list>")
    out.append("</config>\n")
    path.write_text("\n".join(out), encoding="utf-8")
    return path
