//! `cedana-driver bootstrap`: writes the config file from flags, the environment and prompts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::args::BootstrapArgs;
use super::exit::Exit;

/// `bootstrap`: the answers from flags, the environment and (on a terminal) prompts; AWS
/// resources with `--aws-create`; the config written.
pub fn bootstrap(config_path: Option<&Path>, args: BootstrapArgs) -> Exit {
    use cedana_driver::bootstrap as b;
    let Some(path) = config_path
        .map(Path::to_path_buf)
        .or_else(cedana_driver::Config::default_path)
    else {
        super::error("no config path: set HOME or give --config");
        return Exit::Config;
    };
    let fail = |e: b::BootstrapError, exit: Exit| {
        super::error(e);
        exit
    };
    let existing = match b::read_existing(&path) {
        Ok(v) => v,
        Err(e) => return fail(e, Exit::Config),
    };
    let list = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let mut answers = b::Answers {
        providers: list(args.providers),
        aws_regions: list(args.aws_regions),
        aws_families: list(args.aws_families),
        aws_ssh_key_path: args.aws_ssh_key,
        aws_launch_template: args.aws_launch_template,
        paperspace_regions: list(args.paperspace_regions),
        paperspace_ssh_key_path: args.paperspace_ssh_key,
        paperspace_template: args.paperspace_template,
        nats_url: args.nats_url,
        nats_port: args.nats_port,
        checkpoint_interval: args.checkpoint_every,
        shared_storage: args.shared_storage,
        ..Default::default()
    };
    if let Some(f) = &args.paperspace_api_key_file {
        match b::secret_from_file(f) {
            Ok(s) => answers.paperspace_api_key = Some(s),
            Err(e) => return fail(e, Exit::Usage),
        }
    } else if let Some(k) = std::env::var("PAPERSPACE_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        answers.paperspace_api_key = Some(cedana_protocol::config::Secret::new(k.trim()));
    }
    if let Some(f) = &args.auth_token_file {
        match b::secret_from_file(f) {
            Ok(s) => answers.auth_token = Some(s),
            Err(e) => return fail(e, Exit::Usage),
        }
    } else if args.generate_token {
        match b::generate_token() {
            Ok(s) => answers.auth_token = Some(s),
            Err(e) => return fail(e, Exit::Failed),
        }
    }
    let mut account_conf = None;
    if args.nats_account {
        match b::nats_account(&path) {
            Ok((seed, conf_path, conf)) => {
                answers.auth_token = Some(seed);
                account_conf = Some((conf_path, conf));
            }
            Err(e) => return fail(e, Exit::Failed),
        }
    }
    if let Err(e) = b::check_answers(&answers) {
        return fail(e, Exit::Usage);
    }
    let interactive = !args.non_interactive && std::io::stdin().is_terminal();
    if interactive {
        let mut p = b::Prompter {
            input: std::io::stdin().lock(),
            output: std::io::stderr(),
            hide_secrets: true,
        };
        answers = match b::interview(&mut p, &existing, answers) {
            Ok(a) => a,
            Err(e) => return fail(e, Exit::Usage),
        };
    }
    // Checked before anything is made in AWS, and again with what was made.
    if let Err(e) = b::check(&b::apply(existing.clone(), &answers), &path) {
        return fail(e, Exit::Usage);
    }
    let mut created = None;
    if args.aws_create {
        let region = answers
            .aws_regions
            .as_ref()
            .and_then(|r| r.first().cloned())
            .or_else(|| {
                existing["aws"]["enabled_regions"][0]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "us-east-1".into());
        let home = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let want = b::AwsCreate {
            key_path: home.join(format!("{}.pem", args.aws_key_name)),
            region,
            key_name: args.aws_key_name.clone(),
            security_group: args.aws_security_group.clone(),
            template: answers
                .aws_launch_template
                .clone()
                .unwrap_or_else(|| "cedana-worker".into()),
            image: args.aws_image.clone(),
            instance_type: args.aws_instance_type.clone(),
        };
        #[cfg(feature = "aws")]
        let made = match super::runtime() {
            Ok(rt) => b::create_aws_resources(&want, rt.handle()),
            Err(e) => {
                super::error(e);
                return Exit::Failed;
            }
        };
        #[cfg(not(feature = "aws"))]
        let made: Result<b::AwsCreated, b::BootstrapError> = Err(b::BootstrapError::Answer {
            what: "--aws-create".into(),
            message: format!(
                "this driver was built without its `aws` feature (region {})",
                want.region
            ),
        });
        match made {
            Ok(c) => {
                if let Some(p) = &c.key_path {
                    answers.aws_ssh_key_path = Some(p.clone());
                }
                if let Some(t) = &c.launch_template {
                    answers.aws_launch_template = Some(t.clone());
                }
                if !args.json {
                    eprintln!(
                        "AWS {}: key pair {} ({}), security group {}{}",
                        c.region,
                        c.key_name,
                        match (&c.key_path, c.key_created) {
                            (Some(p), true) => format!("made; private key in {}", p.display()),
                            (Some(p), false) => format!("there; private key in {}", p.display()),
                            (None, _) => "there; its private key is not on this machine".into(),
                        },
                        c.security_group_id,
                        match &c.launch_template_id {
                            Some(id) => format!(", launch template {id}"),
                            None => ", no launch template (give --aws-image, or run `cedana-driver bake`)".into(),
                        }
                    );
                }
                created = Some(c);
            }
            Err(e) => return fail(e, Exit::Failed),
        }
    }
    let v = b::apply(existing, &answers);
    let config = match b::check(&v, &path) {
        Ok(c) => c,
        Err(e) => return fail(e, Exit::Usage),
    };
    // The server's part first: a config whose seed no server file names is never left.
    if let Some((conf_path, conf)) = &account_conf {
        // Public keys and JWTs only: the server may run as another user.
        if let Err(e) = b::write_file(conf_path, conf.as_bytes(), 0o644) {
            return fail(e, Exit::Failed);
        }
    }
    if let Err(e) = b::write(&path, &v) {
        return fail(e, Exit::Failed);
    }
    let next = b::next_steps(&config, &path);
    if args.json {
        let out = serde_json::json!({
            "config": path,
            "enabled_providers": config.enabled_providers,
            "nats_url": config.connection.nats_url,
            "nats_account_conf": account_conf.as_ref().map(|(p, _)| p),
            "aws_created": created,
            "next_steps": next,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
    } else {
        println!(
            "wrote {} (providers: {})",
            path.display(),
            config.enabled_providers.join(", ")
        );
        println!("next:");
        for step in &next {
            println!("  - {step}");
        }
    }
    Exit::Ok
}
