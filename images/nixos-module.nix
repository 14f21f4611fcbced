# NixOS module for the agent daemon: `services.cedana-agent`.
#
# The flake's `nixosModules.agent` imports this file and sets `package` and `criuPackage` to the
# flake's static agent and CRIU >= 4.2; imported on its own, set `package` yourself.
#
# Job, worker id, NATS URL and token come from the options below or, with `userData.enable`, from
# the EC2 instance's user-data: lines `KEY=VALUE` (an `export ` prefix and quotes around the value
# are allowed, so the same user-data can be a shell script elsewhere) with the keys
#   CEDANA_JOB, CEDANA_WORKER, CEDANA_NATS_URL, CEDANA_NATS_TOKEN, CEDANA_SHARED_STORAGE
# Other lines are ignored. Options that are set win over user-data.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.cedana-agent;
  inherit (lib) mkEnableOption mkIf mkOption optional optionals types literalExpression;

  runDir = "/run/cedana-agent";
  # Written by cedana-agent-userdata.service; /run is a tmpfs, so the token never reaches a disk.
  userDataEnv = "${runDir}/env";
  userDataToken = "${runDir}/nats-token";
  tokenSource = if cfg.tokenFile != null then cfg.tokenFile else userDataToken;

  args = [ "daemon" "--work-dir" cfg.workDir ]
    ++ optionals (cfg.job != null) [ "--job" cfg.job ]
    ++ optionals (cfg.worker != null) [ "--worker" cfg.worker ]
    ++ optionals (cfg.natsUrl != null) [ "--nats-url" cfg.natsUrl ]
    ++ optionals (cfg.sharedStorage != null) [ "--shared-storage" cfg.sharedStorage ]
    ++ cfg.extraArgs;

  criuVersion = lib.getVersion cfg.criuPackage;
in
{
  options.services.cedana-agent = {
    enable = mkEnableOption "the Cedana agent daemon, which checkpoints and restores this worker's tasks with CRIU on commands from NATS";

    package = mkOption {
      type = types.package;
      description = "The agent (a fully static `cedana-agent`); the flake's module sets its own.";
    };

    criuPackage = mkOption {
      type = types.package;
      default = pkgs.criu;
      defaultText = literalExpression "pkgs.criu";
      description = "CRIU, 4.2 or newer; the flake's module sets its pinned CRIU. The agent finds it through CEDANA_CRIU.";
    };

    natsUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "nats://nats.example.com:4222";
      description = "NATS server URL, or several separated by commas. Null: from user-data (or the agent's config file).";
    };

    tokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/cedana-nats-token";
      description = ''
        File holding the NATS token, handed to the agent through systemd's LoadCredential. A path as
        a string on purpose: the token must never be in the Nix store (it is world-readable).
        Null: the token comes from user-data.
      '';
    };

    job = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Job this worker belongs to. Null: from user-data (CEDANA_JOB).";
    };

    worker = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "This worker's id. Null: from user-data (CEDANA_WORKER).";
    };

    workDir = mkOption {
      type = types.str;
      default = "/var/lib/cedana/work";
      description = "The worker's folder: the tasks' working directory and checkpoint staging.";
    };

    sharedStorage = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/mnt/cedana";
      description = "A folder all workers of the job mount: checkpoints go there instead of the NATS object store. Null: from user-data (CEDANA_SHARED_STORAGE) or the object store.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--heartbeat-secs" "10" ];
      description = "More arguments for `cedana-agent daemon` (see `cedana-agent daemon --help`).";
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = with pkgs; [ bash coreutils gnutar gzip ];
      defaultText = literalExpression "with pkgs; [ bash coreutils gnutar gzip ]";
      description = "On the PATH of the agent and of the tasks it runs (`sh -c` needs a shell).";
    };

    userData = {
      enable = mkEnableOption "reading job, worker, NATS URL and token from the EC2 instance's user-data (IMDSv2)";

      endpoint = mkOption {
        type = types.str;
        default = "http://169.254.169.254";
        description = "Instance metadata service to read user-data from.";
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.tokenFile != null || cfg.userData.enable;
        message = "services.cedana-agent: set tokenFile (a file holding the NATS token) or userData.enable (token from CEDANA_NATS_TOKEN in the user-data)";
      }
      {
        assertion = cfg.tokenFile == null
          || (lib.hasPrefix "/" cfg.tokenFile && !lib.hasPrefix "${builtins.storeDir}/" cfg.tokenFile);
        message = "services.cedana-agent.tokenFile must be an absolute path outside the Nix store (the store is world-readable), e.g. /run/secrets/cedana-nats-token";
      }
      {
        assertion = (cfg.job != null && cfg.worker != null) || cfg.userData.enable;
        message = "services.cedana-agent: set job and worker, or userData.enable to read them from the user-data";
      }
      {
        assertion = lib.versionAtLeast criuVersion "4.2";
        message = "services.cedana-agent.criuPackage is CRIU ${criuVersion}; the agent needs 4.2 or newer (older ones cannot dump TCP/UDP sockets on Linux 6.16+ or run at all on 6.13+)";
      }
    ];

    environment.systemPackages = [ cfg.package cfg.criuPackage ];

    systemd.tmpfiles.rules = [ "d ${cfg.workDir} 0700 root root -" ];

    systemd.services.cedana-agent-userdata = mkIf cfg.userData.enable {
      description = "Cedana agent: job, worker and NATS settings from EC2 user-data";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [ pkgs.curl pkgs.coreutils ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        RuntimeDirectory = "cedana-agent";
        RuntimeDirectoryMode = "0700";
        RuntimeDirectoryPreserve = true;
        UMask = "0077";
      };
      script = ''
        endpoint=${lib.escapeShellArg cfg.userData.endpoint}
        ud=${runDir}/user-data
        if ! token=$(curl -sSf --retry 10 --retry-connrefused --retry-delay 1 -X PUT \
          -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$endpoint/latest/api/token"); then
          echo "no IMDSv2 token from $endpoint; set services.cedana-agent options instead" >&2
          exit 1
        fi
        if ! curl -sSf --retry 10 --retry-connrefused --retry-delay 1 \
          -H "X-aws-ec2-metadata-token: $token" -o "$ud" "$endpoint/latest/user-data"; then
          echo "cannot read user-data from $endpoint (IMDSv2); set services.cedana-agent options instead" >&2
          exit 1
        fi
        : > ${userDataEnv}.new
        rm -f ${userDataToken}
        while IFS= read -r line || [ -n "$line" ]; do
          line=''${line%$'\r'}
          line=''${line#export }
          case "$line" in
            CEDANA_JOB=* | CEDANA_WORKER=* | CEDANA_NATS_URL=* | CEDANA_NATS_TOKEN=* | CEDANA_SHARED_STORAGE=*) ;;
            *) continue ;;
          esac
          key=''${line%%=*}
          value=''${line#*=}
          case "$value" in
            \"*\") value=''${value#\"}; value=''${value%\"} ;;
            \'*\') value=''${value#\'}; value=''${value%\'} ;;
          esac
          if [ "$key" = CEDANA_NATS_TOKEN ]; then
            printf '%s' "$value" > ${userDataToken}
          else
            printf '%s=%s\n' "$key" "$value" >> ${userDataEnv}.new
          fi
        done < "$ud"
        rm -f "$ud"
        mv ${userDataEnv}.new ${userDataEnv}
        ${lib.optionalString (cfg.tokenFile == null) ''
          if [ ! -s ${userDataToken} ]; then
            echo "the user-data has no CEDANA_NATS_TOKEN and services.cedana-agent.tokenFile is not set" >&2
            exit 1
          fi
        ''}
      '';
    };

    systemd.services.cedana-agent = {
      description = "Cedana agent: checkpoint and restore this worker's tasks with CRIU";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      requires = optional cfg.userData.enable "cedana-agent-userdata.service";
      after = [ "network-online.target" ]
        ++ optional cfg.userData.enable "cedana-agent-userdata.service";
      path = cfg.extraPackages;
      environment = {
        CEDANA_CRIU = "${cfg.criuPackage}/bin/criu";
        CEDANA_WORK_DIR = cfg.workDir;
      };
      # Restart=always must never give up.
      startLimitIntervalSec = 0;
      serviceConfig = {
        # %d is the credentials folder: the token is read from there, never from the command
        # line, the environment or the store.
        ExecStart = "${cfg.package}/bin/cedana-agent ${utils.escapeSystemdExecArgs args} --token-file %d/nats-token";
        LoadCredential = [ "nats-token:${tokenSource}" ];
        EnvironmentFile = mkIf cfg.userData.enable "-${userDataEnv}";
        Restart = "always";
        RestartSec = 2;
        User = "root";
        StateDirectory = "cedana";
        StateDirectoryMode = "0700";
        # The tasks live in this unit's cgroup: an OOM kill of one task is reported by the agent
        # (its exit status), it must not stop the unit; many threads are normal for jobs.
        OOMPolicy = "continue";
        TasksMax = "infinity";
        # CRIU warns below this and restores processes that had many files open.
        LimitNOFILE = 1048576;
        # Deliberately absent, because CRIU and the tasks it restores need them: a private mount
        # namespace (PrivateTmp, ProtectSystem, ProtectHome, ProtectKernelTunables — CRIU writes
        # /proc/sys/kernel/ns_last_pid, ProtectControlGroups — it restores cgroups), seccomp
        # filters (SystemCallFilter, SystemCallArchitectures, LockPersonality,
        # MemoryDenyWriteExecute — the restorer maps W+X memory, and an inherited filter would be
        # dumped with every task), a device allow-list (ProtectClock, PrivateDevices — jobs use
        # GPUs), RestrictNamespaces (tasks get their own PID namespace), NoNewPrivileges and a
        # reduced CapabilityBoundingSet (restored tasks keep their privileges). KillMode stays
        # control-group: a restarted agent cannot adopt old tasks, the job's checkpoints are the
        # way back.
      };
    };
  };
}
