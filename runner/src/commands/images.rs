//! `runner images build|list|verify`.

use engine::image::{store, ImageName, ImageStore, Recipe, RecipeLookup, RepositoryRecipes};
use engine::Arch;

use crate::cli::{AccelArg, ImagesCommand};
use crate::exit;
use crate::outcome::Outcome;
use crate::report::console::Status;
use crate::run::platform;

pub async fn run(cmd: ImagesCommand, store: &ImageStore, status: &Status) -> i32 {
    match cmd {
        ImagesCommand::Build {
            arch,
            recipe,
            mirror,
            force,
            accel,
        } => build(store, &arch, recipe.as_deref(), mirror, force, accel, status).await,
        ImagesCommand::Key { arch, recipe } => key(&arch, recipe.as_deref(), status),
        ImagesCommand::List => list(store),
        ImagesCommand::Verify => verify(store),
    }
}

/// `runner images` runs on the user's own machine: a recipe is looked up in the current
/// directory's `images/` too, then among the built-in ones.
fn user_recipes() -> RecipeLookup {
    RecipeLookup {
        operator_dir: None,
        repository: std::env::current_dir()
            .map(RepositoryRecipes::Honoured)
            .unwrap_or(RepositoryRecipes::Refused),
    }
}

/// The architectures named on the command line, or the one-line reason one is unknown.
fn parse_arches(names: &[String]) -> Result<Vec<Arch>, String> {
    names
        .iter()
        .map(|n| n.trim().parse::<Arch>().map_err(|e| e.to_string()))
        .collect()
}

/// The recipe named `name`, or the one-line reason there is none.
fn find_recipe(name: &str, recipes: &RecipeLookup) -> Result<Recipe, String> {
    let name: ImageName = name.parse().map_err(|e| format!("RECIPE: {e}"))?;
    recipes
        .find(&name)
        .map_err(|e| engine::image::build::error_chain(&e))
}

async fn build(
    store: &ImageStore,
    arches: &[String],
    recipe: Option<&str>,
    mirror: Option<String>,
    force: bool,
    accel: AccelArg,
    status: &Status,
) -> i32 {
    let arches = match parse_arches(arches) {
        Ok(a) => a,
        Err(e) => {
            status.error(&e);
            return exit::CONFIG;
        }
    };
    let recipes = user_recipes();
    let mut code = exit::SUCCESS;
    for arch in arches {
        let recipe = recipe.unwrap_or(arch.default_image());
        let image_name = match find_recipe(recipe, &recipes) {
            Ok(r) => match mirror.as_deref().map(|m| r.with_mirror(m)) {
                Some(Err(e)) => {
                    status.error(&e.to_string());
                    return exit::USAGE;
                }
                _ => r.name,
            },
            Err(e) => {
                status.error(&e);
                return exit::CONFIG;
            }
        };
        let result = async {
            let platform = platform::resolve(arch, accel.into(), store).await?;
            let spinner = status.spinner(&format!("{arch}: checking image {recipe}"));
            let progress = |msg: &str| spinner.set_message(format!("{arch}: {msg}"));
            let image = platform::base_image(
                store,
                &image_name,
                &recipes,
                &platform,
                mirror.clone(),
                force,
                &progress,
            )
            .await;
            spinner.finish_and_clear();
            image
        };
        // Ctrl-C / SIGTERM drop the build: its staging directory, its tool process groups and
        // its bake VM all go with it (a plain exit would leave mmdebstrap running).
        let result = tokio::select! {
            r = result => r,
            _ = super::interrupted() => Err(Outcome::Cancelled),
        };
        match result {
            Ok(image) => status.line(&format!(
                "{arch}: {} ready ({} packages, kernel {}) in {}",
                image.manifest.recipe,
                image.manifest.packages.len(),
                image.manifest.kernel_version,
                image.dir.display()
            )),
            Err(outcome) => {
                status.error(&outcome_message(&outcome));
                code = outcome.exit_code();
                if outcome == Outcome::Cancelled {
                    break;
                }
            }
        }
    }
    code
}

/// Prints the cache key of the image for each of `arches` (`recipe`, else the arch's
/// default): the same name as the image's directory, computed without building anything
/// (no QEMU needed).
fn key(arches: &[String], recipe: Option<&str>, status: &Status) -> i32 {
    let arches = match parse_arches(arches) {
        Ok(a) => a,
        Err(e) => {
            status.error(&e);
            return exit::CONFIG;
        }
    };
    for arch in arches {
        let recipe = match find_recipe(recipe.unwrap_or(arch.default_image()), &user_recipes()) {
            Ok(r) => r,
            Err(e) => {
                status.error(&e);
                return exit::CONFIG;
            }
        };
        if let Err(e) = engine::image::build::check_distribution(&recipe, arch) {
            status.error(&e.to_string());
            return exit::CONFIG;
        }
        let hash = recipe.hash(arch, engine::image::initramfs::INIT_SCRIPT);
        println!("{}-{arch}-{hash}", recipe.name);
    }
    exit::SUCCESS
}

pub fn outcome_message(o: &Outcome) -> String {
    match o {
        Outcome::InfraError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

fn list(store: &ImageStore) -> i32 {
    let images = store.list();
    if images.is_empty() {
        println!(
            "no images in {}; build one with `runner images build --arch riscv64`",
            store.images_dir().display()
        );
        return exit::SUCCESS;
    }
    println!(
        "{:<12} {:<9} {:<18} {:>8} {:<8} PATH",
        "IMAGE", "ARCH", "HASH", "SIZE", "STATE"
    );
    for (dir, state) in images {
        match state {
            Ok(m) => {
                let size: u64 = m.artifacts.values().map(|a| a.size).sum();
                println!(
                    "{:<12} {:<9} {:<18} {:>7}M {:<8} {}",
                    m.recipe,
                    m.arch,
                    m.recipe_hash,
                    size >> 20,
                    "ok",
                    dir.display()
                );
            }
            Err(e) => println!(
                "{:<12} {:<9} {:<18} {:>8} {:<8} {} ({e})",
                "?",
                "?",
                "?",
                "-",
                "corrupt",
                dir.display()
            ),
        }
    }
    exit::SUCCESS
}

fn verify(store: &ImageStore) -> i32 {
    let mut code = exit::SUCCESS;
    for (dir, state) in store.list() {
        let result = store::load(&dir).and_then(|img| store::verify(&img, true));
        match (state, result) {
            (_, Ok(())) => println!("ok       {}", dir.display()),
            (_, Err(e)) => {
                println!("corrupt  {}: {e}", dir.display());
                code = exit::IMAGE;
            }
        }
    }
    code
}
