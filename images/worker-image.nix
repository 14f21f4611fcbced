# The worker's OCI image: the static agent as entrypoint (`cedana-agent daemon`), CRIU >= 4.2,
# busybox as the shell and the usual commands for the job (`sh -c` is how the daemon runs them),
# CA certificates for TLS to NATS, /etc/passwd and /etc/group for root; the same parts as the
# image images/build.sh makes without Nix (which uses Debian's CRIU). Nothing else: CRIU's
# network lock for TCP connections goes through libnftables (linked into CRIU), so no iptables
# binary is needed; nixpkgs' CRIU wrapper already points CR_IPTABLES and CR_IP_TOOL at its own
# iptables and iproute2 for dumping network namespaces.
#
# The daemon takes its job, worker id, NATS URL and token from the environment:
#   CEDANA_JOB, CEDANA_WORKER, CEDANA_NATS_URL, CEDANA_NATS_TOKEN
# and extra flags from the command (appended to the entrypoint). CRIU needs root with broad
# capabilities: run the container privileged (CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE,
# CAP_SYS_PTRACE, CAP_NET_ADMIN, no seccomp or AppArmor confinement).
{ dockerTools
, busybox
, agent
, criu
, created ? "1970-01-01T00:00:01Z"
, tag ? agent.version
, source ? ""
}:
let
  workDir = "/var/lib/cedana/work";
in
dockerTools.buildLayeredImage {
  name = "cedana-worker";
  inherit tag created;

  contents = [
    agent
    criu
    busybox
    dockerTools.caCertificates
    dockerTools.fakeNss
  ];

  # Runs in the build sandbox on the image's root, without root rights: only folders and modes.
  extraCommands = ''
    mkdir -p tmp var/tmp run root .${workDir}
    chmod 1777 tmp var/tmp
    chmod 0700 root var/lib/cedana .${workDir}
  '';

  config = {
    Entrypoint = [ "${agent}/bin/cedana-agent" "daemon" ];
    Cmd = [ ];
    WorkingDir = workDir;
    Env = [
      "PATH=/bin:/sbin"
      "HOME=/root"
      "CEDANA_CRIU=${criu}/bin/criu"
      "CEDANA_WORK_DIR=${workDir}"
      "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt"
    ];
    Labels = {
      "org.opencontainers.image.title" = "cedana-worker";
      "org.opencontainers.image.description" =
        "Cedana worker: cedana-agent daemon with CRIU, checkpoints and restores the job's tasks";
      "org.opencontainers.image.version" = agent.version;
      "org.opencontainers.image.created" = created;
      "org.opencontainers.image.licenses" = "Apache-2.0";
      "org.opencontainers.image.source" = source;
      "dev.cedana.agent.version" = agent.version;
      "dev.cedana.criu.version" = criu.version;
      "dev.cedana.busybox.version" = busybox.version;
      "dev.cedana.requires" =
        "root; CAP_SYS_ADMIN CAP_CHECKPOINT_RESTORE CAP_SYS_PTRACE CAP_NET_ADMIN; unconfined seccomp and AppArmor";
    };
  };
}
