{
  # Reproducible builds of Cedana. The lock file (flake.lock) is created by the first
  # `nix flake lock` on a machine with network access; these development machines have none.
  # Nothing here has been built yet: CI only parses these files and checks the names they use
  # (tools/check-nix.sh). See docs/nix.md.
  description = "Cedana: keep long jobs alive across clouds by checkpointing them with CRIU";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      workspace = (lib.importTOML ./Cargo.toml).workspace.package;

      # Only what cargo reads, so editing images or docs does not rebuild the binaries.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./protocol ./store ./agent ./driver ./tests ];
      };

      rustCommon = {
        inherit (workspace) version;
        inherit src;
        cargoLock.lockFile = ./Cargo.lock;
        # The end-to-end tests need root and CRIU; they run in CI, not in the build sandbox.
        doCheck = false;
      };

      meta = {
        homepage = workspace.repository;
        license = lib.licenses.asl20;
        platforms = lib.platforms.linux;
      };

      # The image's creation time is the commit's, so the same commit gives the same image.
      created =
        let d = self.lastModifiedDate or "19700101000001";
        in "${builtins.substring 0 4 d}-${builtins.substring 4 2 d}-${builtins.substring 6 2 d}T"
          + "${builtins.substring 8 2 d}:${builtins.substring 10 2 d}:${builtins.substring 12 2 d}Z";

      # NixOS worker for EC2: the agent as a service, settings from user-data.
      workerAmi = system: lib.nixosSystem {
        modules = [
          { nixpkgs.hostPlatform = system; }
          self.nixosModules.agent
          ./images/ami.nix
        ];
      };
    in
    {
      packages = forAllSystems (pkgs:
        let system = pkgs.stdenv.hostPlatform.system;
        in rec {
          # CRIU >= 4.2 (nixpkgs' own when new enough, else its recipe on the 4.2 release).
          criu = pkgs.callPackage ./images/criu.nix { };

          # musl, fully static: the one binary every worker image carries.
          agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage (rustCommon // {
            pname = "cedana-agent";
            cargoBuildFlags = [ "-p" "cedana-agent" ];
            postInstall = ''
              if ''${READELF:-readelf} -l $out/bin/cedana-agent | grep -q 'program interpreter'; then
                echo "cedana-agent has a program interpreter: it is not fully static" >&2
                exit 1
              fi
            '';
            meta = meta // {
              description = "Checkpoint and restore Linux processes with CRIU (static agent)";
              mainProgram = "cedana-agent";
            };
          });

          # The driver finds nats-server, the agent for local workers and CRIU through these
          # variables; set them to use others.
          driver = pkgs.rustPlatform.buildRustPackage (rustCommon // {
            pname = "cedana-driver";
            cargoBuildFlags = [ "-p" "cedana-driver" ];
            nativeBuildInputs = [ pkgs.makeWrapper ];
            postInstall = ''
              wrapProgram $out/bin/cedana-driver \
                --set-default CEDANA_NATS_SERVER ${pkgs.nats-server}/bin/nats-server \
                --set-default CEDANA_AGENT_BIN ${agent}/bin/cedana-agent \
                --set-default CEDANA_CRIU ${criu}/bin/criu
            '';
            meta = meta // {
              description = "Run long jobs on the cheapest machine and keep them alive across preemption";
              mainProgram = "cedana-driver";
            };
          });

          # OCI image (docker-archive .tar.gz): `cedana-agent daemon` with CRIU.
          worker-image = pkgs.callPackage ./images/worker-image.nix {
            inherit agent criu created;
            source = workspace.repository;
          };

          # AWS image: a VHD to import as an AMI (docs/nix.md).
          ami = (workerAmi system).config.system.build.amazonImage;

          default = agent;
        });

      devShells = forAllSystems (pkgs:
        let own = self.packages.${pkgs.stdenv.hostPlatform.system};
        in {
          # Everything the README's commands and the tests need.
          default = pkgs.mkShell {
            packages = with pkgs; [
              cargo
              rustc
              clippy
              rustfmt
              own.criu
              nats-server
              (python3.withPackages (ps: [ ps.moto ps.flask ps.flask-cors ]
                ++ (ps.moto.optional-dependencies.server or [ ])
                ++ (ps.moto.optional-dependencies.ec2 or [ ])))
              openssh
              runc
              umoci
              skopeo
              iproute2
              util-linux
              procps
              zip
              unzip
              jq
            ];
            CEDANA_CRIU = "${own.criu}/bin/criu";
            RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
          };
        });

      # `services.cedana-agent`, with the flake's agent and CRIU as defaults.
      nixosModules.agent = { lib, pkgs, ... }:
        let
          system = pkgs.stdenv.hostPlatform.system;
          own = self.packages.${system}
            or (throw "cedana: no packages for ${system}; set services.cedana-agent.package and criuPackage");
        in
        {
          imports = [ ./images/nixos-module.nix ];
          services.cedana-agent.package = lib.mkDefault own.agent;
          services.cedana-agent.criuPackage = lib.mkDefault own.criu;
        };
      nixosModules.default = self.nixosModules.agent;

      nixosConfigurations = {
        worker-ami = workerAmi "x86_64-linux";
        worker-ami-aarch64 = workerAmi "aarch64-linux";
      };

      # `nix flake check` builds these.
      checks = forAllSystems (pkgs: {
        inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) agent driver worker-image;
      });
    };
}
