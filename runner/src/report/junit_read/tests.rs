//! The reader against every fixture, lenient shapes, non-JUnit input, entities, depth and
//! random mutations.

use super::fixtures::{counts, unnamed, Counts, ALL};
use super::*;
use rand::{Rng, SeedableRng};

fn case<'r>(report: &'r Report, name: &str) -> &'r TestCase {
    report
        .test_suites
        .iter()
        .flat_map(|s| &s.test_cases)
        .find(|c| c.name.as_str() == name)
        .unwrap_or_else(|| panic!("no testcase {name}"))
}

fn description(case: &TestCase) -> &str {
    match &case.status {
        TestCaseStatus::NonSuccess { description, .. }
        | TestCaseStatus::Skipped { description, .. } => {
            description.as_ref().map_or("", |d| d.as_str())
        }
        TestCaseStatus::Success { .. } => "",
    }
}

#[test]
fn every_producer_is_read_with_its_counts() {
    for f in ALL {
        let report = read(f.xml, f.path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counts(&report), f.counts, "{}", f.path);
        // Each suite's own counters agree with its testcases.
        for s in &report.test_suites {
            assert_eq!(
                s.tests,
                s.test_cases.len(),
                "{} / {}",
                f.path,
                s.name.as_str()
            );
        }
    }
}

#[test]
fn the_bugs_shape_keeps_every_testcase() {
    let (xml, want) = unnamed(3000);
    let report = read(&xml, "build/results.xml").unwrap();
    assert_eq!(counts(&report), want);
    assert_eq!(want.failures, 30);
    // The suite is named after the file; testcases keep their names, no classname.
    assert_eq!(report.test_suites.len(), 1);
    assert_eq!(report.test_suites[0].name.as_str(), "build/results.xml");
    assert_eq!(report.test_suites[0].time, None);
    let c = case(&report, "case 100");
    assert_eq!(c.classname, None);
    assert_eq!(c.time, Some(Duration::from_millis(10)));
}

#[test]
fn names_fall_back() {
    let ctest = read(ALL[1].xml, "build/ctest.xml").unwrap();
    assert_eq!(ctest.test_suites[0].name.as_str(), "build/ctest.xml");
    let tap = read(ALL[7].xml, "tap.xml").unwrap();
    let names: Vec<_> = tap.test_suites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["tap.xml", "tap.xml"]);
    // Nested suites are flattened; the containers that only group others are dropped.
    let php = read(ALL[9].xml, "phpunit.xml").unwrap();
    let names: Vec<_> = php.test_suites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "App\\Tests\\CalculatorTest",
            "App\\Tests\\CalculatorTest::testParses"
        ]
    );
    // An unnamed nested suite takes its parent's name; an unnamed testcase its classname,
    // else its place.
    let xml = r#"<testsuites><testsuite name="outer"><testsuite><testcase classname="k"/>
        <testcase/></testsuite></testsuite></testsuites>"#;
    let r = read(xml, "x.xml").unwrap();
    assert_eq!(r.test_suites[0].name.as_str(), "outer");
    let cases: Vec<_> = r.test_suites[0]
        .test_cases
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cases, ["k", "(unnamed testcase 2)"]);
}

#[test]
fn details_are_kept() {
    let pytest = read(ALL[0].xml, "p.xml").unwrap();
    let c = case(&pytest, "test_divide_by_zero");
    assert_eq!(
        c.extra.get("file").map(|v| v.as_str()),
        Some("tests/test_calc.py")
    );
    assert_eq!(c.extra.get("line").map(|v| v.as_str()), Some("9"));
    assert!(description(c).contains(">       assert divide(1, 0) == 0"));
    let c = case(&pytest, "test_writes");
    assert!(c
        .system_out
        .as_ref()
        .unwrap()
        .as_str()
        .contains("wrote 4 bytes"));
    assert!(c
        .system_err
        .as_ref()
        .unwrap()
        .as_str()
        .contains("slow disk"));
    // Character references. (quick-junit's XmlString drops the tabs among them.)
    let go = read(ALL[2].xml, "g.xml").unwrap();
    let d = description(case(&go, "TestMain"));
    assert!(
        d.contains("goroutine 7 [running]:\nexample.com/calc/net"),
        "{d}"
    );
    // A flaky run keeps its own output apart from its text.
    let nextest = read(ALL[4].xml, "n.xml").unwrap();
    let TestCaseStatus::Success { flaky_runs } =
        &case(&nextest, "clock::never_goes_backwards").status
    else {
        panic!("not a success");
    };
    let run = &flaky_runs[0];
    assert!(run
        .description
        .as_ref()
        .unwrap()
        .as_str()
        .contains("clock went backwards"));
    assert!(!run
        .description
        .as_ref()
        .unwrap()
        .as_str()
        .contains("running 1 test"));
    assert!(run.system_out.as_ref().unwrap().as_str().contains("FAILED"));
    assert_eq!(run.time, Some(Duration::from_millis(101)));
    let TestCaseStatus::NonSuccess { reruns, .. } = &case(&nextest, "overflow").status else {
        panic!("not a failure");
    };
    assert_eq!(reruns.len(), 1);
    let surefire = read(ALL[5].xml, "s.xml").unwrap();
    let TestCaseStatus::Success { flaky_runs } = &case(&surefire, "parsesHex").status else {
        panic!("not a success");
    };
    assert!(flaky_runs[0]
        .stack_trace
        .as_ref()
        .unwrap()
        .as_str()
        .contains("CalculatorTest.java:41"));
    assert_eq!(surefire.test_suites[0].properties.len(), 4);
    let jest = read(ALL[6].xml, "j.xml").unwrap();
    assert!(description(case(&jest, "calculator divides by zero")).contains("(<anonymous>)"));
    assert!(jest.test_suites[1].system_out.is_some());
}

#[test]
#[rustfmt::skip]
fn lenient_readings() {
    // (what, xml, tests, failures, errors, skipped)
    let cases = [
        ("status attribute",
         r#"<testsuite><testcase name="a" status="skipped"/><testcase name="b" status="run"/></testsuite>"#,
         2, 0, 0, 1),
        ("result attribute",
         r#"<testsuite><testcase name="a" result="failure"/><testcase name="b" result="ERROR"/></testsuite>"#,
         2, 1, 1, 0),
        ("the element wins over the attribute",
         r#"<testsuite><testcase name="a" status="fail"><skipped/></testcase></testsuite>"#,
         1, 0, 0, 1),
        ("a failure outweighs a skip",
         r#"<testsuite><testcase name="a"><skipped/><error/></testcase></testsuite>"#,
         1, 0, 1, 0),
        ("message, body, both or neither",
         r#"<testsuite><testcase name="a"><failure/></testcase><testcase name="b"><failure message="m"/></testcase>
            <testcase name="c"><failure>body</failure></testcase><testcase name="d"><error message="m" type="t">body</error></testcase></testsuite>"#,
         4, 3, 1, 0),
        ("bad and absent times",
         r#"<testsuite time="soon"><testcase name="a" time="NaN"/><testcase name="b" time="-1"/><testcase name="c" time="1e999"/><testcase name="d"/></testsuite>"#,
         4, 0, 0, 0),
        ("unknown elements and attributes",
         r#"<testsuite name="s" flavour="x"><meta><testcase name="hidden"/></meta><testcase name="a" colour="red"><weird/><failure>x<b>y</b></failure></testcase></testsuite>"#,
         1, 1, 0, 0),
        ("testcases right under testsuites",
         r#"<testsuites><testcase name="a"/><testcase name="b"><failure/></testcase></testsuites>"#,
         2, 1, 0, 0),
        ("two reports concatenated",
         "<?xml version=\"1.0\"?><testsuite><testcase name=\"a\"/></testsuite>\n<?xml version=\"1.0\"?><testsuite><testcase name=\"b\"><failure/></testcase></testsuite>",
         2, 1, 0, 0),
        ("a BOM, no declaration",
         "\u{feff}<testsuite><testcase name=\"a\"/></testsuite>",
         1, 0, 0, 0),
        ("a namespace prefix",
         r#"<j:testsuite xmlns:j="urn:x"><j:testcase name="a"/></j:testsuite>"#,
         1, 0, 0, 0),
        ("an empty suite",
         r#"<?xml version="1.0"?><!-- made by hand --><testsuite name="none"/>"#,
         0, 0, 0, 0),
        ("a bare ampersand and an unknown entity",
         r#"<testsuite><testcase name="a & b"><failure message="&nbsp;">x & y &foo;</failure></testcase></testsuite>"#,
         1, 1, 0, 0),
    ];
    for (what, xml, tests, failures, errors, skipped) in cases {
        let r = read(xml, "r.xml").unwrap_or_else(|e| panic!("{what}: {e}"));
        let want = Counts { tests, failures, errors, skipped, flaky: 0 };
        assert_eq!(counts(&r), want, "{what}");
    }
}

#[test]
fn declared_entities_are_never_expanded() {
    let xml = r#"<?xml version="1.0"?>
<!DOCTYPE testsuite [
  <!ENTITY xxe SYSTEM "file:///etc/passwd">
  <!ENTITY lol "lollollollollollollollollollol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<testsuite name="&lol2;"><testcase name="t"><failure message="&xxe;">&xxe;&lol2;</failure></testcase></testsuite>"#;
    let r = read(xml, "e.xml").unwrap();
    assert_eq!(r.test_suites[0].name.as_str(), "&lol2;");
    let c = case(&r, "t");
    assert_eq!(description(c), "&xxe;&lol2;");
    let TestCaseStatus::NonSuccess { message, .. } = &c.status else {
        panic!("not a failure");
    };
    assert_eq!(message.as_ref().unwrap().as_str(), "&xxe;");
}

#[test]
#[rustfmt::skip]
fn what_is_not_junit_is_a_one_line_error() {
    let half = &ALL[0].xml[..ALL[0].xml.len() / 2];
    type IsExpected = fn(&Reason) -> bool;
    // (what, xml, is it the expected reason?)
    let cases: [(&str, &str, IsExpected); 8] = [
        ("html", "<!DOCTYPE html>\n<html><body><h1>502 Bad Gateway</h1></body></html>",
         |r| *r == Reason::WrongRoot("html".into())),
        ("plain text", "Segmentation fault (core dumped)\n", |r| *r == Reason::NoElement),
        ("empty", "", |r| *r == Reason::NoElement),
        ("json", r#"{"tests": 3}"#, |r| *r == Reason::NoElement),
        ("the runner's own note", "<!-- not read: more than 200 reports or 64 MiB in all -->",
         |r| *r == Reason::OnlyNote("not read: more than 200 reports or 64 MiB in all".into())),
        ("truncated inside an element", half, |r| matches!(r, Reason::Truncated(_))),
        ("truncated inside a tag", "<testsuite>\n  <testcase name=\"a\"><oops",
         |r| matches!(r, Reason::Malformed { line: 2, .. })),
        ("mismatched end", "<testsuite><testcase></testsuite>",
         |r| matches!(r, Reason::Malformed { line: 1, .. })),
    ];
    for (what, xml, want) in cases {
        let e = read(xml, "out/r.xml").expect_err(what);
        assert!(want(&e.reason), "{what}: {e}");
        let text = e.to_string();
        assert!(text.starts_with("out/r.xml is not valid JUnit XML: "), "{text}");
        assert!(!text.contains('\n'), "{what}: {text}");
    }
}

#[test]
fn nesting_is_bounded() {
    let deep = format!("<testsuite>{}", "<x>".repeat(100_000));
    assert_eq!(read(&deep, "d.xml").unwrap_err().reason, Reason::TooDeep);
    let suites = "<testsuite>".repeat(MAX_DEPTH + 1);
    assert_eq!(read(&suites, "d.xml").unwrap_err().reason, Reason::TooDeep);
    // Just inside the bound is fine.
    let ok = format!(
        "{}<testcase name=\"deep\"/>{}",
        "<testsuite>".repeat(MAX_DEPTH - 1),
        "</testsuite>".repeat(MAX_DEPTH - 1)
    );
    assert_eq!(counts(&read(&ok, "d.xml").unwrap()).tests, 1);
}

/// Random truncations and mutations of every fixture: never a panic, errors in one line,
/// and what does read is consistent.
#[test]
fn mutated_reports_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let alphabet: Vec<char> = "<>/&;\"'=! ?[]#x-\n\u{0}é".chars().collect();
    for f in ALL {
        let chars: Vec<char> = f.xml.chars().collect();
        for _ in 0..300 {
            let mut m = chars.clone();
            match rng.gen_range(0..3) {
                0 => m.truncate(rng.gen_range(0..m.len())),
                1 => {
                    for _ in 0..rng.gen_range(1..8) {
                        let i = rng.gen_range(0..m.len());
                        m[i] = alphabet[rng.gen_range(0..alphabet.len())];
                    }
                }
                _ => {
                    let a = rng.gen_range(0..m.len());
                    let b = rng.gen_range(a..m.len());
                    m.drain(a..b);
                }
            }
            let xml: String = m.into_iter().collect();
            match read(&xml, f.path) {
                Ok(r) => {
                    for s in &r.test_suites {
                        assert_eq!(s.tests, s.test_cases.len());
                    }
                }
                Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
            }
        }
    }
}
