{
  # Reproducible builds of Cedana. The lock file (flake.lock) is created by the first
  # `nix flake lock` on a machine with network access; these development machines have none.
  description = "Cedana: keep long jobs alive across clouds by checkpointing them with CRIU";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" ] (system:
      let
        pkgs = import nixpkgs { inherit system; };
        src = pkgs.lib.cleanSourceWith {
          src = ./.;
          filter = path: type:
            let base = baseNameOf path;
            in !(builtins.elem base [ "target" ".git" "bench-results" ]);
        };
        common = {
          version = "0.1.0";
          inherit src;
          cargoLock.lockFile = ./Cargo.lock;
          # The end-to-end tests need root and CRIU; they run in CI, not in the sandbox.
          doCheck = false;
        };
      in
      {
        packages = rec {
          # musl, fully static: the one binary every worker image carries.
          agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage (common // {
            pname = "cedana-agent";
            cargoBuildFlags = [ "-p" "cedana-agent" ];
          });
          driver = pkgs.rustPlatform.buildRustPackage (common // {
            pname = "cedana-driver";
            cargoBuildFlags = [ "-p" "cedana-driver" ];
          });
          default = agent;
        };

        # Everything the README's commands need.
        devShells.default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            criu
            nats-server
            python3
            zip
            unzip
            iproute2
            procps
          ];
          CEDANA_CRIU = "${pkgs.criu}/bin/criu";
        };
      });
}
