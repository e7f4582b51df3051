// vitdecomp explorer: a few conveniences; every page works without this script.
document.addEventListener("DOMContentLoaded", function () {
  // clicking a TextSpan text fills the first empty text box (topic, then contrastive)
  document.querySelectorAll("a.use-text").forEach(function (a) {
    a.addEventListener("click", function (ev) {
      ev.preventDefault();
      var t1 = document.getElementById("in-text"), t2 = document.getElementById("in-text2");
      if (t1 && !t1.value) { t1.value = a.dataset.text; } else if (t2) { t2.value = a.dataset.text; }
    });
  });
  // a form being answered is greyed out
  document.querySelectorAll("form").forEach(function (f) {
    f.addEventListener("submit", function () { document.body.classList.add("busy"); });
  });
  // a heatmap cell's tooltip: component, property, score
  document.querySelectorAll("td.cell").forEach(function (td) {
    td.title = td.dataset.component + " × " + td.dataset.property + ": " + td.dataset.score;
  });
});
